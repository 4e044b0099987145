"""Keep the memory a streaming merge holds bounded by the tensors in flight."""

from __future__ import annotations

import sys

_ALLOCATOR_BOUNDED = False
ARENAS = 2


def bound_allocator() -> None:
    """Make glibc hand large tensor buffers straight back to the OS when they are freed.

    Tensors are read on one thread and freed on another; with glibc's default (a threshold that
    grows up to 32 MB) such buffers are recycled through per-thread heaps that fragment, and peak
    RSS creeps up with the number of tensors merged. A fixed 1 MiB mmap threshold keeps it
    bounded by the tensors in flight (measured in benchmarks/merge_speed.py). The merge kernels'
    worker threads allocate their sub-MiB temporaries from the heap; at most ``ARENAS`` heaps
    keep what those threads retain small (``merge_speed.py --child suite-ties`` on a 0.35 GB x 4
    pool: peak RSS 2858-2902 MB against 2942 MB with a heap per thread).
    """
    global _ALLOCATOR_BOUNDED
    if _ALLOCATOR_BOUNDED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_BOUNDED = True
    try:
        import ctypes

        M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_ARENA_MAX, ARENAS)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
