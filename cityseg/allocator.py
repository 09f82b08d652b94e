"""Host memory allocator settings for training on CPU.

PyTorch's CPU tensors come from glibc's malloc, which serves every block above its mmap threshold (128 KiB,
adapting up to 32 MiB) with a fresh ``mmap`` and unmaps it on free. A training step frees and reallocates
its activations every iteration, so each step page-faults many of them in again, and ranks faulting at the
same time slow each other down (in a virtual machine especially, where page faults are expensive). Keeping
freed memory in the heap, as jemalloc and tcmalloc do, removes that cost; it is what PyTorch's CPU
performance guide gets by preloading one of them. The price is that the process keeps its peak heap until
it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters of glibc
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap and never trim it (glibc only); returns whether it was applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): leave the allocator as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mmap_max 0: no block gets its own mapping; trim threshold -1: freed memory is never given back
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
