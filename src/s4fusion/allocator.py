"""glibc's malloc settings for fusing on the CPU.

PyTorch takes CPU tensors straight from ``malloc``. glibc serves a block larger
than its mmap threshold (128 KiB, raised by itself up to 32 MiB) with fresh pages
from ``mmap`` and unmaps them when the block is freed, and it gives memory freed at
the top of its heap back to the system beyond its trim threshold. A fuse
allocates and frees gigabytes in tensors of 1 to 80 MiB, so the kernel faults in
and zero-fills those pages again and again. :func:`retain_freed_memory` raises
both thresholds: freed blocks stay in the process and the next tensors reuse them
(a 640x480 fuse on the 2-core development machine: 2.36 -> 2.13 s, peak RSS +80
MiB; BENCHMARKS.md, CPU section).

The setting is process-wide, so importing the package never makes it. The CLI
makes it for runs on the CPU; API users may call it. Where the environment sets
glibc's own tunables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
``glibc.malloc`` in ``GLIBC_TUNABLES``), those win and nothing is changed; other C
libraries and systems are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["retain_freed_memory"]

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_LIMIT = 1 << 30
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def retain_freed_memory(limit: int = DEFAULT_LIMIT) -> bool:
    """Keep freed blocks of up to ``limit`` bytes, and up to ``limit`` bytes of free
    memory at the top of the heap, in the process (glibc's ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD``). Returns whether the settings were made: False where the C
    library is not glibc, or the environment sets glibc's tunables."""
    if not 0 < limit < 2**31:
        raise ValueError(f"limit must be between 1 and 2**31 - 1 bytes (a C int), got {limit}")
    if any(name in os.environ for name in _ENVIRONMENT) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):  # not glibc
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) & bool(mallopt(M_TRIM_THRESHOLD, limit))
