"""glibc malloc settings that keep the peak memory of a backup down (measured in bench/)."""

from __future__ import annotations

import ctypes

__all__ = ["tune_malloc"]

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
