"""Decoded verification sets cached on disk, keyed by the .bin file's sha256.

Decoding a real set (12-14k JPEGs) takes seconds per set and is repeated for
every checkpoint a user evaluates in a separate run; the decoded pixels are a
pure function of the file's bytes and the image size, so they are kept as two
plain ``.npy`` files (no pickle: loading them cannot run code) and reused,
memory-mapped, by any later run on the same bytes, whatever the file is called.

The cache folder is ``$FACETRAIN_CACHE`` if set (``off`` or an empty value
disables it), else ``$XDG_CACHE_HOME/facetrain`` or ``~/.cache/facetrain``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from utils.atomic import write_atomic
from utils.checkpoint import sha256_file

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
    """sha256 of a file, computed once per process for an unchanged file."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _save(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def load_decoded(path: str, image_size: tuple[int, int] = (112, 112), cache_dir: str | None = "default",
                 progress: bool = False) -> DecodedBin:
    """The decoded images and flags of a .bin, from the cache when its bytes were decoded before.

    ``cache_dir`` None switches the cache off; "default" means :func:`default_cache_dir`.
    A damaged cache entry is ignored and rewritten, never trusted.
    """
    from data.bins import decode_bin  # local: cv2 only when something must be decoded

    digest = file_sha256(path)
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    if cache_dir:
        stem = os.path.join(cache_dir, "decoded", f"{digest}_{image_size[0]}x{image_size[1]}")
        hit = _read_entry(stem, image_size)
        if hit is not None:
            return DecodedBin(hit[0], hit[1], digest, True)
    images, issame = decode_bin(path, image_size=image_size, progress=progress)
    issame = np.asarray(issame, dtype=bool)
    if cache_dir:
        try:
            # flags first, images last: the images file existing marks a complete entry
            write_atomic(stem + ".issame.npy", lambda tmp: _save(tmp, issame))
            write_atomic(stem + ".images.npy", lambda tmp: _save(tmp, images))
        except OSError:  # a read-only or full cache disk costs speed, not the evaluation
            pass
    return DecodedBin(images, issame, digest, False)


def _read_entry(stem: str, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        images = np.load(stem + ".images.npy", mmap_mode="r", allow_pickle=False)
        issame = np.load(stem + ".issame.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    ok = (images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (*image_size, 3)
          and issame.dtype == bool and issame.ndim == 1 and images.shape[0] == 2 * issame.shape[0])
    return (images, issame) if ok else None
