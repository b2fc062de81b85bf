"""Process-level settings the scripts apply at start (never at import).

glibc's malloc hands blocks above its mmap threshold straight back to the
kernel on free; a CNN on the CPU frees and re-allocates tens of MB of
activations every layer, so the kernel re-zeroes the same pages again and
again (measured here: system time equal to compute time in evaluation, about
2x slower overall). Raising the thresholds keeps that memory in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap/trim thresholds; returns False where it does not apply (not glibc)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    return bool(ok)
