"""What encoded image bytes are, from their magic bytes: one table for every tool that asks.

unpack names files by it, pack decides what to store as is, inspect counts formats,
the device decoder picks its JPEG path.
"""

from __future__ import annotations

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
