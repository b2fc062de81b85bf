"""What encoded image bytes are, from their magic bytes: one table for every tool that asks.

unpack names files by it, pack decides what to store as is, inspect counts formats,
the device decoder picks its JPEG path; and how large an image claims to be, read from its
header, so that no decoder is handed a 100k x 100k "image" to allocate.
"""

from __future__ import annotations

import numpy as np

# (format name, file extension, ((offset, bytes), ...)): every (offset, bytes) must match
_SIGNATURES: tuple[tuple[str, str, tuple[tuple[int, bytes], ...]], ...] = (
    ("jpeg", ".jpg", ((0, b"\xff\xd8\xff"),)),
    ("png", ".png", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("webp", ".webp", ((0, b"RIFF"), (8, b"WEBP"))),
    ("gif", ".gif", ((0, b"GIF87a"),)),
    ("gif", ".gif", ((0, b"GIF89a"),)),
    ("bmp", ".bmp", ((0, b"BM"),)),
    ("tiff", ".tif", ((0, b"II*\x00"),)),
    ("tiff", ".tif", ((0, b"MM\x00*"),)),
    ("jp2", ".jp2", ((0, b"\x00\x00\x00\x0cjP  \r\n\x87\n"),)),
)
UNKNOWN = "unknown"
UNKNOWN_EXTENSION = ".dat"  # bytes that match no image signature (written as they are)
KNOWN_EXTENSIONS = frozenset(ext for _, ext, _ in _SIGNATURES) | {UNKNOWN_EXTENSION}


def _match(payload: bytes) -> tuple[str, str]:
    head = bytes(payload[:16])
    for name, ext, parts in _SIGNATURES:
        if all(head[off:off + len(magic)] == magic for off, magic in parts):
            return name, ext
    return UNKNOWN, UNKNOWN_EXTENSION


def image_format(payload: bytes) -> str:
    """'jpeg', 'png', 'webp', 'gif', 'bmp', 'tiff', 'jp2', or 'unknown'."""
    return _match(payload)[0]


def payload_extension(payload: bytes) -> str:
    """File extension ('.jpg', '.png', ...) of encoded image bytes; '.dat' when none matches."""
    return _match(payload)[1]


# Pixels one image may claim before it is refused undecoded (2^26, 67 Mpx: 8192 x 8192; a face crop is 112 x 112).
MAX_IMAGE_PIXELS = 1 << 26


def _be(data: bytes, off: int, n: int) -> int:
    return int.from_bytes(data[off:off + n], "big")


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): not DHT C4, JPG C8, DAC CC
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    pos, n = 2, len(data)
    while pos + 4 <= n:  # each step advances at least 2 bytes: bounded by the payload size
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        length = _be(data, pos + 2, 2)
        if marker in _JPEG_SOF:
            return (_be(data, pos + 5, 2), _be(data, pos + 7, 2)) if pos + 9 <= n else None
        pos += 2 + max(length, 2)
    return None


def _le(data: bytes, off: int, n: int) -> int:
    return int.from_bytes(data[off:off + n], "little")


def _webp_dimensions(head: bytes) -> tuple[int, int] | None:
    """(height, width) from the first chunk of a RIFF/WEBP file: VP8 (lossy), VP8L (lossless) or VP8X (extended)."""
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return _le(head, 28, 2) & 0x3FFF, _le(head, 26, 2) & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = _le(head, 21, 4)
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return _le(head, 27, 3) + 1, _le(head, 24, 3) + 1
    return None


def encoded_dimensions(payload: bytes | np.ndarray) -> tuple[int, int] | None:
    """(height, width) in pixels an encoded image claims in its header, without decoding it.

    Read for PNG (IHDR), JPEG (the first SOF segment), GIF (logical screen), BMP (DIB header) and
    WebP (its VP8 / VP8L / VP8X header); None for other formats or a header too short to say.
    """
    head = bytes(payload[:1 << 16]) if isinstance(payload, bytes) else payload[:1 << 16].tobytes()
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return _be(head, 20, 4), _be(head, 16, 4)
    if head[:3] == b"\xff\xd8\xff":
        return _jpeg_dimensions(head)
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[8:10], "little"), int.from_bytes(head[6:8], "little")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_dimensions(head)
    if head[:2] == b"BM" and len(head) >= 26:
        return abs(int.from_bytes(head[22:26], "little", signed=True)), int.from_bytes(head[18:22], "little",
                                                                                        signed=True)
    return None


def oversize(payload: bytes | np.ndarray) -> str | None:
    """Why ``payload`` must not be decoded ("its header claims W x H pixels, over ..."), or None."""
    dims = encoded_dimensions(payload)
    if dims is not None and dims[0] * dims[1] > MAX_IMAGE_PIXELS:
        return (f"its header claims {dims[1]}x{dims[0]} pixels (width x height), over the "
                f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx limit for one image")
    return None
