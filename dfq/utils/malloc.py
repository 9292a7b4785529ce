"""Keep freed memory in the process's heap (glibc), for the CLI's long CPU runs.

glibc hands every freed block over 32 MiB back to the kernel and maps a fresh one on the next
allocation, so each large activation costs page faults and zero-filling: at 224 px that was
half of a MobileNetV2 reconstruction's wall time and a fifth of a distillation step's on 2
cores (benchmarks/reconstruct.md, session 12). Serving such blocks from the heap instead, and
not trimming it, keeps the peak resident; the results do not change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and its heap trimming; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
