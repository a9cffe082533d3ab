"""Process memory: the peak resident size, and freed heap handed back to the system between batches
(glibc only; a no-op elsewhere).

torch frees a batch's activations to glibc's heap, which keeps them: glibc raises its mmap
threshold after large frees, so later large blocks come from the heap and fragment it. Over 64
calibration batches of an 800x608 detector, RSS grew from 1.3 to 2.2 GB that way; trimming after
each batch keeps it at the size of one batch (bench/COVERAGE.md peak RSS column).
"""
from __future__ import annotations

import ctypes
import ctypes.util

_libc = None


def trim() -> None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
            if _libc and not hasattr(_libc, "malloc_trim"):
                _libc = False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
