"""Decoded verification sets cached on disk, keyed by the .bin file's sha256.

Decoding a real set (12-14k JPEGs) takes seconds per set and is repeated for
every checkpoint a user evaluates in a separate run; the decoded pixels are a
pure function of the file's bytes and the image size, so they are kept as two
plain ``.npy`` files (no pickle: loading them cannot run code) and reused,
memory-mapped, by any later run on the same bytes, whatever the file is called.
A third file, ``<entry>.json``, written last, records the sha256 of each array's data; an
entry is used only when both arrays hash to it (one read pass over the data), so a damaged
or edited entry is never reported under the real .bin's sha256: it is ignored, with a
one-line note, and rewritten.

The cache folder is ``$FACETRAIN_CACHE`` if set (``off`` or an empty value
disables it), else ``$XDG_CACHE_HOME/facetrain`` or ``~/.cache/facetrain``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Callable, NamedTuple

import numpy as np

from utils.atomic import write_atomic, write_json
from utils.files import check_regular
from utils.torchfile import sha256_file

_HASHES: dict[tuple, str] = {}  # (abspath, size, mtime_ns) -> sha256, so a file is hashed once per process


class DecodedBin(NamedTuple):
    images: np.ndarray  # (2N, H, W, 3) uint8 RGB (memory-mapped when it came from the cache)
    issame: np.ndarray  # (N,) bool
    sha256: str  # of the .bin file's bytes
    cached: bool  # True when read from the cache instead of decoded


def default_cache_dir() -> str | None:
    """The cache folder from the environment, or None when caching is switched off."""
    env = os.environ.get("FACETRAIN_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "facetrain")


def file_sha256(path: str) -> str:
    """sha256 of a .bin file, computed once per process for an unchanged file.

    A FIFO or device is refused unread (UnreadableFileError): hashing one would block or never end.
    """
    check_regular(path, ".bin file")
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _save(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def _data_sha256(arr: np.ndarray) -> str:
    """sha256 of an array's raw bytes (C order): one pass, straight from the memory map when it is one."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def load_decoded(path: str, image_size: tuple[int, int] = (112, 112), cache_dir: str | None = "default",
                 progress: bool = False, min_pairs: int = 0, log: Callable[[str], None] | None = None) -> DecodedBin:
    """The decoded images and flags of a .bin, from the cache when its bytes were decoded before.

    ``cache_dir`` None switches the cache off; "default" means :func:`default_cache_dir`.
    ``min_pairs``: refuse a set with fewer pairs (data.bins.check_pair_count), before decoding.
    A damaged cache entry is ignored and rewritten, never trusted; ``log`` (default: stderr)
    gets a one-line note when an entry's data does not match its recorded checksum.
    """
    from data.bins import check_pair_count, decode_bin  # local: cv2 only when something must be decoded

    log = log or _stderr
    digest = file_sha256(path)
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    if cache_dir:
        stem = os.path.join(cache_dir, "decoded", f"{digest}_{image_size[0]}x{image_size[1]}")
        hit = _read_entry(stem, image_size, log)
        if hit is not None:
            if min_pairs:
                check_pair_count(path, len(hit[1]), min_pairs)
            return DecodedBin(hit[0], hit[1], digest, True)
    images, issame = decode_bin(path, image_size=image_size, progress=progress, min_pairs=min_pairs)
    issame = np.asarray(issame, dtype=bool)
    if cache_dir:
        meta = {"bin_sha256": digest, "images_sha256": _data_sha256(images), "issame_sha256": _data_sha256(issame),
                "images_shape": list(images.shape), "pairs": int(issame.size)}
        try:
            # the arrays first, the checksums last: the .json existing marks a complete entry
            write_atomic(stem + ".issame.npy", lambda tmp: _save(tmp, issame))
            write_atomic(stem + ".images.npy", lambda tmp: _save(tmp, images))
            write_json(stem + ".json", meta)
        except OSError:  # a read-only or full cache disk costs speed, not the evaluation
            pass
    return DecodedBin(images, issame, digest, False)


def _read_entry(stem: str, image_size: tuple[int, int],
                log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray] | None:
    """The entry's arrays if complete, well-formed and equal to their recorded sha256; else None."""
    try:
        with open(stem + ".json", encoding="utf-8") as fh:
            meta = json.load(fh)
        images = np.load(stem + ".images.npy", mmap_mode="r", allow_pickle=False)
        issame = np.load(stem + ".issame.npy", allow_pickle=False)
    except (OSError, ValueError):  # missing (incomplete or older entry), truncated, not .npy / JSON
        return None
    ok = (isinstance(meta, dict) and images.dtype == np.uint8 and images.ndim == 4
          and images.shape[1:] == (*image_size, 3) and issame.dtype == bool and issame.ndim == 1
          and images.shape[0] == 2 * issame.shape[0])
    if ok and (meta.get("images_sha256") != _data_sha256(images) or meta.get("issame_sha256") != _data_sha256(issame)):
        log(f"note: decode cache entry {stem}.*.npy does not match the checksum recorded in {stem}.json; "
            "ignored, decoding again")
        ok = False
    return (images, issame) if ok else None
