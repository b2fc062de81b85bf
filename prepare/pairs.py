"""Verification pairs on disk: pairs files (ours and LFW's) and building a .bin from images + pairs.

Two pairs-file formats, told apart by their first line:

- ours (written by ``unpack-bin``): ``<image_a> <image_b> <1|0>`` per line, paths relative
  to the images folder (no spaces inside a path);
- LFW's published ``pairs.txt`` (and ``pairsDevTrain.txt``/``pairsDevTest.txt``): a header
  ``10 300`` (folds, pairs per half-fold) or ``1100`` (pairs per half), then same-person lines
  ``name i j`` and different-person lines ``name1 i name2 j`` (tabs in the published files;
  spaces accepted), image ``name/name_%04d.jpg``.

A .bin made here stores the image files' bytes as they are when they are JPEG or PNG (no
generation loss); other formats are decoded and stored as PNG.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from data.bins import NFOLDS, label_warning, write_bin
from data.imageformat import oversize
from data.sources import DataSourceError
from prepare.unpack import payload_extension
from utils.atomic import write_text
from utils.files import MB, max_image_bytes, read_regular

Pair = tuple[str, str, bool]
Line = tuple[int, list[str]]  # (1-based line number, whitespace-separated fields)
_STORED_AS_IS = (".jpg", ".png")
_OURS_HINT = "'<image_a> <image_b> <1|0>'"
MAX_PAIRS_FILE_BYTES = 256 * MB  # LFW's pairs.txt is ~100 KB; a larger "pairs file" is a wrong argument
_LFW_HINT = "'name<TAB>i<TAB>j' (same person) or 'name1<TAB>i<TAB>name2<TAB>j' (different people)"


class PairsError(DataSourceError):
    """A pairs file that is missing, malformed or names a missing image; the message names file:line."""


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _is_lfw_header(fields: list[str]) -> bool:
    return 1 <= len(fields) <= 2 and all(f.isdigit() for f in fields)


def _is_lfw_pair(fields: list[str]) -> bool:
    if len(fields) == 3:
        return fields[1].isdigit() and fields[2].isdigit()
    return len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit()


def _parse_ours(path: str, root: str, lines: list[Line]) -> list[tuple[int, Pair]]:
    pairs = []
    for no, fields in lines:
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise PairsError(f"{path}:{no}: expected {_OURS_HINT}, got {' '.join(fields)[:80]!r}")
        pairs.append((no, (os.path.join(root, fields[0]), os.path.join(root, fields[1]), fields[2] == "1")))
    return pairs


def _lfw_image(root: str, name: str, number: int) -> str:
    return os.path.join(root, name, f"{name}_{number:04d}.jpg")


def _parse_lfw(path: str, root: str, lines: list[Line]) -> list[tuple[int, Pair]]:
    expected, header = None, ""
    if lines and _is_lfw_header(lines[0][1]):
        counts = [int(f) for f in lines[0][1]]
        expected = 2 * counts[0] if len(counts) == 1 else 2 * counts[0] * counts[1]
        header = " ".join(lines[0][1])
        lines = lines[1:]
    pairs = []
    for no, fields in lines:
        nums = [_int(fields[k]) for k in ((1, 2) if len(fields) == 3 else (1, 3))] if len(fields) in (3, 4) else []
        if not nums or None in nums or 0 in nums:
            raise PairsError(f"{path}:{no}: expected {_LFW_HINT} with image numbers from 1, "
                             f"got {' '.join(fields)[:80]!r}")
        if len(fields) == 3:
            pair = (_lfw_image(root, fields[0], nums[0]), _lfw_image(root, fields[0], nums[1]), True)
        else:
            pair = (_lfw_image(root, fields[0], nums[0]), _lfw_image(root, fields[2], nums[1]), False)
        pairs.append((no, pair))
    if expected is not None and expected != len(pairs):
        raise PairsError(f"{path}:1: header '{header}' means {expected} pairs, but the file has {len(pairs)}")
    return pairs


# format name -> parser(path, images_root, content lines) -> [(line number, pair)]
PAIRS_FORMATS: dict[str, Callable[[str, str, list[Line]], list[tuple[int, Pair]]]] = {
    "ours": _parse_ours,
    "lfw": _parse_lfw,
}


def detect_format(lines: Sequence[Line]) -> str:
    """'lfw' when the first line is an LFW header (``10 300``, ``1100``) or an LFW pair line, else 'ours'."""
    if not lines:
        return "ours"
    first = lines[0][1]
    return "lfw" if _is_lfw_header(first) or _is_lfw_pair(first) else "ours"


def read_lines(path: str) -> list[Line]:
    """Non-blank lines of a text file as (line number, fields split on any whitespace).

    A FIFO or device is refused unread (UnreadableFileError), so is a file over 256 MB.
    """
    try:
        raw = read_regular(path, "pairs file", MAX_PAIRS_FILE_BYTES)
    except FileNotFoundError:
        raise PairsError(f"{path}: no such pairs file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PairsError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    lines = [(no, line.split()) for no, line in enumerate(text.splitlines(), start=1)]
    return [(no, fields) for no, fields in lines if fields]


def parse_pairs(path: str | os.PathLike, images_root: str | os.PathLike, check_images: bool = True) -> list[Pair]:
    """(path_a, path_b, issame) per pair, in file order, from our pairs.txt format or LFW's.

    Paths are ``images_root`` joined with the file's names. ``check_images``: every image
    must exist (PairsError names file:line and the image otherwise).
    """
    path, root = os.fspath(path), os.fspath(images_root)
    if not os.path.isdir(root):
        raise PairsError(f"{root}: no such images folder (needed by {path})")
    lines = read_lines(path)
    numbered = PAIRS_FORMATS[detect_format(lines)](path, root, lines)
    if not numbered:
        raise PairsError(f"{path}: no pairs (expected {_OURS_HINT} lines or LFW's pairs.txt)")
    if check_images:
        for no, (a, b, _) in numbered:
            for image in (a, b):
                if not os.path.isfile(image):
                    raise PairsError(f"{path}:{no}: image {image} not found")
    return [pair for _, pair in numbered]


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> None:
    """Write our pairs format atomically: ``<a> <b> <1|0>`` per line (paths as given)."""
    lines = []
    for a, b, same in pairs:
        if any(c.isspace() for c in a + b):
            raise ValueError(f"pairs file {path}: image name with whitespace ({a!r}, {b!r}) cannot be written")
        lines.append(f"{a} {b} {int(bool(same))}\n")
    write_text(os.fspath(path), "".join(lines))


def image_payload(path: str, detect=None) -> tuple[bytes, bool]:
    """(bytes to store, converted?) for one image file: JPEG/PNG as on disk, any other format as PNG.

    Only regular files within the per-image cap (utils.files.max_image_bytes) are read. ``detect`` (a
    prepare.align.DetectRules): a raw photo; its face is found, aligned to 112x112 and stored as PNG.
    """
    data = read_regular(path, "image", max_image_bytes())
    why = oversize(data)  # evaluate.py would refuse it; OpenCV here would allocate up to 1 Gpx, or assert
    if why:
        raise PairsError(f"{path}: {why}; refused undecoded")
    if detect is None and payload_extension(data) in _STORED_AS_IS:
        return data, False
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error:
        img = None
    if img is None:
        raise PairsError(f"{path}: not a decodable image ({len(data)} bytes, starting {data[:8]!r})")
    if detect is not None:
        from prepare.align import detect_and_align

        found = detect_and_align(img, detect)
        if not found:
            raise PairsError(f"{path}: no face found (min face {detect.min_face:g} px, min score "
                             f"{detect.min_score:g}); a pair cannot lose an image")
        img = found[0][0]
    ok, buf = cv2.imencode(".png", img)  # BGR in, BGR out: the colours of the file are kept
    if not ok:  # pragma: no cover
        raise RuntimeError(f"OpenCV could not encode {path} as PNG")
    return buf.tobytes(), True


def make_bin(images_root: str | os.PathLike, pairs_path: str | os.PathLike, out_bin: str | os.PathLike,
             kind: str = "bytes", progress: bool = True, min_pairs: int = 0, detect=None) -> dict:
    """Write a verification .bin (written atomically) from an images folder and a pairs file.

    Pair order is the file's; pair i is items 2i, 2i+1. ``kind`` as :func:`data.bins.write_bin`:
    'bytes', 'py2str' (like the original insightface files) or 'ndarray' (1-D uint8 arrays).
    ``min_pairs``: refuse a pairs file with fewer pairs before reading any image (``make-bin``
    passes NFOLDS = 10: the protocol cannot score fewer).
    ``detect``: raw photos, aligned on the way (see image_payload).
    Returns {'pairs', 'same', 'images', 'unique_images', 'converted', 'bytes', 'seconds', 'out',
    'warning'}; 'warning' is e.g. "all 12 pairs are 'same'" (such a set scores 100% for any
    model), else None.
    """
    t0 = time.perf_counter()
    out_bin = os.fspath(out_bin)
    pairs = parse_pairs(pairs_path, images_root)
    if len(pairs) < min_pairs:
        raise PairsError(f"{os.fspath(pairs_path)}: {len(pairs)} pair{'s' if len(pairs) != 1 else ''}; a "
                         f"verification .bin needs at least {min_pairs} pairs for {NFOLDS}-fold verification")
    cache: dict[str, bytes] = {}
    converted = 0
    payloads: list[bytes] = []
    for a, b, _ in tqdm(pairs, desc=f"make-bin {os.path.basename(out_bin)}", unit="pair", disable=not progress,
                        dynamic_ncols=True):
        for image in (a, b):
            if image not in cache:
                cache[image], was_converted = image_payload(image, detect)
                converted += was_converted
            payloads.append(cache[image])
    os.makedirs(os.path.dirname(os.path.abspath(out_bin)), exist_ok=True)
    write_bin(out_bin, payloads, [same for _, _, same in pairs], kind=kind)
    return {"pairs": len(pairs), "same": sum(same for _, _, same in pairs), "images": len(payloads),
            "unique_images": len(cache), "converted": converted, "bytes": os.path.getsize(out_bin),
            "seconds": time.perf_counter() - t0, "out": out_bin,
            "warning": label_warning([same for _, _, same in pairs])}
