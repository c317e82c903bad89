"""Opt-in, process-wide: let glibc keep freed memory for reuse instead of returning it to the OS.

    import sim.allocator
    sim.allocator.keep_freed_memory()   # once, at the start of a process that simulates many workers

Why: a simulated step of W workers allocates and frees per-worker tensors of W x (parameter size) bytes (the
per-worker gradients, error feedback's g + e): 64 MB each for a 1024 x 1024 layer at W = 16. glibc serves
every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on
free, so every step page-faults in, and the kernel zeroes, hundreds of MB that the previous step just gave
back. The plain big-batch SGD step the simulator is compared with holds tensors of one worker's size, which
stay in the heap. Measured (``benchmarks/overhead.py``, mlp-4x1024, W = 16, one thread): the step's ratio to
that floor falls from ~2.2 to ~1.8 at B = 128, from ~5.6 to ~3.5 at B = 32; BENCHMARKS.md has the current
figures.

What it does: ``mallopt(M_MMAP_MAX, 0)`` (no mmap for big blocks: they come from the heap) and
``mallopt(M_TRIM_THRESHOLD, INT_MAX)`` (freed heap memory up to 2 GiB at the heap's top is kept for reuse,
not trimmed). The cost: the
process keeps its peak heap as resident memory until it exits. PyTorch's CPU performance guide makes the same
point by recommending jemalloc or tcmalloc. The environment variables ``MALLOC_MMAP_MAX_=0`` and
``MALLOC_TRIM_THRESHOLD_=2147483647`` do the same from outside the process (the Makefile's ``demo``
and ``bench`` targets do not set them; ``python -m sim`` calls this function).

Nothing in ``sim`` calls this on import: it changes the whole process, so a library leaves it to its caller.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's mallopt parameter numbers (malloc.h); int mallopt(int param, int value)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def is_glibc() -> bool:
    return _libc() is not None


def keep_freed_memory() -> bool:
    """Apply the two mallopt settings above; True where they took effect (glibc), False elsewhere (no-op)."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok_mmap = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
    return ok_mmap and ok_trim
