"""Keep the memory that large tensors free in the process, for the next ones (glibc).

A CPU scan makes and frees tensors of the same sizes batch after batch: shard buffers of
tens of MB, the matcher's intermediates. glibc's malloc serves allocations above its mmap
threshold (128 KiB, adapting up to 32 MiB) with fresh mappings and hands freed memory
back to the kernel, so every page of the next tensor is faulted in and zero-filled again:
a 68 MB tensor took 17,409 page faults each time on this project's 2-core machine, and
none once freed memory was kept and the heap had grown to it (``tests/test_allocator.py``).
:func:`retain_freed_memory` raises the mmap and trim thresholds so that freed memory stays
in the heap for reuse; the process then keeps its peak (bounded by the scan's own budgets)
until it exits, which suits a task process.

It changes the whole process, so it is asked for where a process's heavy CPU work starts,
:meth:`dtm_ops.search.Searcher.scan` on the CPU (a scan task, a search, the demo), and
``DTM_RETAIN_FREED_MB=0`` turns it off. Elsewhere than glibc it does nothing. :func:`kept`
says whether it is in force, for work whose best size depends on it (the spectral method's
frames per pass on the CPU, :func:`dtm_ops.spectral.cpu_chunk_frames`).
"""

from __future__ import annotations

import ctypes
import platform

from dtm_ops.settings import env_number

#: Environment variable: MiB of freed memory a process may keep (both thresholds); 0: off.
ENV = "DTM_RETAIN_FREED_MB"
DEFAULT_MB = 1024
MAX_MB = (1 << 31) - 1 >> 20  # mallopt takes a C int
_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3
_applied: int | None = None


def setting() -> int:
    """Bytes from ``DTM_RETAIN_FREED_MB`` (default 1024 MiB); 0 means off."""
    return env_number(ENV, DEFAULT_MB, minimum=0, maximum=MAX_MB) << 20


def retain_freed_memory() -> int:
    """Raise glibc's mmap and trim thresholds to :func:`setting`, once per value.

    Returns the bytes now in force, or 0 where nothing was changed (off, or not glibc)."""
    global _applied
    want = setting()
    if want == 0 or platform.libc_ver()[0] != "glibc":
        return 0
    if _applied != want:
        libc = ctypes.CDLL("libc.so.6")
        if not (libc.mallopt(_M_MMAP_THRESHOLD, want) and libc.mallopt(_M_TRIM_THRESHOLD, want)):
            return 0
        _applied = want
    return want


def kept() -> int:
    """Bytes of freed memory this process keeps: what :func:`retain_freed_memory` put in
    force, 0 where it has not (or changed nothing)."""
    return _applied or 0
