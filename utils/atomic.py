"""Atomic file writes: readers never see a half-written file, and a crash
mid-write leaves the previous version in place."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str, fsync: bool = True) -> Iterator[str]:
    """Yield a hidden temporary path beside `path` (``.NAME.<pid>.tmp``); on success it replaces `path`.

    With `fsync` the bytes reach the disk before the rename makes them visible (a crash then keeps
    either the old file or the new one). Without it (for writers of millions of small files, where
    it would cost hours) a crash can lose the newest files but never leaves a torn one under its
    name. On an exception the temporary file is removed and `path` is untouched; the temp name is
    unique per process, so parallel writers do not collide.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    """Write `data` to `path` atomically (see `atomic_path`; no fsync by default: unpackers write millions)."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_atomic(path: str, writer: Callable[[str], Any]) -> None:
    """Call `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_json(path: str, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")

    write_atomic(path, _write)


def write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8), atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    write_atomic(path, _write)
