"""How the process takes memory: freed memory kept for reuse (Linux with glibc only).

XLA:CPU takes each call's buffers afresh, and glibc hands large ones back to the kernel when they
are freed, so the next call maps them again, 4 KiB per page fault: on the 2-core machine of
docs/BENCHMARKS.md half of an MNIST net's training step was page faults. `retain_freed_memory()`
keeps freed memory in one heap for the next call (glibc's mallopt: one arena, no separate mappings,
no trimming): that step, ResNet-50 and Xception training and inference run 1.1-1.9x faster; the
price is a higher peak (memory freed in one shape is not always reusable in another: ResNet-50
training 2.3 -> 3.3 GB). The `zoo` command calls it first (`zoo.cli.command`), and so do the
scripts under scripts/; a program of yours can call it before its first computation.
FCNZOO_ALLOCATOR=glibc leaves glibc as it is. Standard library only: safe before jax starts.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>


def retain_freed_memory() -> bool:
    """Keep freed memory for reuse instead of returning it to the kernel; returns whether glibc
    took the settings. Call it before the first computation: threads that already allocated keep
    their own arenas."""
    if os.environ.get("FCNZOO_ALLOCATOR", "retain") == "glibc":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt takes an int: 2**31 - 1 would still trim a heap whose free top passes 2 GiB (Xception's
    # training step, batch 8, gave 2.9 GB back and faulted it in again every step); -1 never trims.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
