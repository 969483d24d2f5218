"""glibc malloc settings that keep the peak memory of a backup down (measured in bench/)."""

from __future__ import annotations

import contextlib
import ctypes

__all__ = ["keep_freed_memory", "tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc() -> None:
    """One arena (per-thread arenas hold on to large freed buffers: 100 MB or more with
    worker threads), and a fixed mmap threshold of 8 MiB: pack buffers are mapped and
    unmapped on free, instead of glibc raising the threshold after the first free and
    keeping released 16 MiB packs in the heap (first backup of bench/files.py: peak 266 ->
    228 MiB at the same speed; a 1 MiB threshold gave 215 MiB but cost ~5 % of speed in
    page faults). Nothing to do where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 1)
        libc.mallopt(_M_MMAP_THRESHOLD, 8 << 20)
    except (OSError, AttributeError):
        pass


def keep_freed_memory(limit_bytes: int = 32 << 20) -> None:
    """Keep up to ``limit_bytes`` of freed memory at the top of the heap for the next
    allocations instead of giving it back at once (the trim threshold is 128 KiB once the
    mmap threshold is fixed). For jobs that allocate and free the same large buffers over
    and over: a disk backup reading 4 MiB pieces faulted 620,000 fresh pages for a 2 GiB
    image; with 32 MiB kept, 176,000, and the backup took 2.97 s instead of 3.81 s (a disk
    restore 1.80 s instead of 2.03 s) for 6 MiB more peak memory. Not for file backups: their
    worker processes would each keep it (peak +45 MiB for 4 % of speed)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(_M_TRIM_THRESHOLD, limit_bytes)
