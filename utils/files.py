"""Reading files we did not write: regular files only, and never more than a cap.

A FIFO, a device (``/dev/zero``) or a socket where an image or a ``.bin`` is expected would
block ``open()`` or feed bytes forever; a 5 GB "image" would be read whole before the decoder
refuses it. Every reader of untrusted input goes through these two functions, so neither can
happen anywhere.
"""

from __future__ import annotations

import os
import stat

from utils.errors import UserError

MB = 1 << 20
# Bytes one image file may hold before it is refused unread (a 112x112 face JPEG is ~5 KB, a
# full-resolution photo a few MB). $FACETRAIN_MAX_IMAGE_MB overrides it for unusual data.
DEFAULT_MAX_IMAGE_MB = 64.0


class UnreadableFileError(UserError, ValueError):
    """A path that is not a regular file, or one larger than the cap for its kind (one line, names the path)."""


def size_from_env(var: str, default: float, unit: int, unit_name: str) -> int:
    """A size cap in bytes: ``$var`` (a positive number of ``unit_name``) if set, else ``default`` of them."""
    raw = os.environ.get(var, "")
    try:
        amount = float(raw) if raw else default
    except ValueError:
        raise UnreadableFileError(f"${var}={raw!r} is not a number of {unit_name}") from None
    if not amount > 0 or amount == float("inf"):
        raise UnreadableFileError(f"${var}={raw!r} must be a positive number of {unit_name}")
    return int(amount * unit)


def max_image_bytes() -> int:
    """The per-image size cap in bytes ($FACETRAIN_MAX_IMAGE_MB, else 64 MB)."""
    return size_from_env("FACETRAIN_MAX_IMAGE_MB", DEFAULT_MAX_IMAGE_MB, MB, "megabytes")


def check_regular(path: str, what: str = "file", max_bytes: int | None = None) -> int:
    """Return the size of ``path`` if it is a regular file (symlinks followed) within ``max_bytes``.

    Raises FileNotFoundError for a missing path and UnreadableFileError for a directory, FIFO,
    device or socket, or a file over the cap; never opens the path (opening a FIFO blocks).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise UnreadableFileError(f"{path}: is {kind}, not a regular {what}; refused unread")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UnreadableFileError(f"{path}: {st.st_size / MB:.1f} MB, over the {max_bytes / MB:g} MB limit for "
                                  f"one {what} (set $FACETRAIN_MAX_IMAGE_MB to raise it)")
    return st.st_size


def read_regular(path: str, what: str = "file", max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, read without blocking on special files.

    The size is checked again on the open descriptor (O_NONBLOCK, so a path swapped for a FIFO
    after the check cannot block), and at most ``max_bytes + 1`` bytes are read.
    """
    check_regular(path, what, max_bytes)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFileError(f"{path}: not a regular {what}; refused unread")
        limit = st.st_size if max_bytes is None else min(st.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise UnreadableFileError(f"{path}: grew past the {max_bytes / MB:g} MB limit for one {what} while read")
    return data
