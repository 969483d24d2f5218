"""Chunk arithmetic shared by disk backups and restores: which chunks extents touch, how
they are grouped into reads, and whether a chunk is all zeros (never stored)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt

from stratavault.sources import ZEROS

__all__ = ["chunk_runs", "hole_chunks", "is_zero", "number_runs", "read_groups"]


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is all zero bytes (fast: compares 1 MiB at a time with memcmp)."""
    view = memoryview(data).cast("B")
    step = len(ZEROS)
    return all(ZEROS.startswith(view[pos : pos + step]) for pos in range(0, len(view), step))


def chunk_runs(
    extents: Iterable[tuple[int, int]], size_bytes: int, chunk_bytes: int
) -> Iterator[tuple[int, int]]:
    """``(first chunk, count)`` runs of the chunks that ``extents`` touch, merged, in order."""
    total = -(-size_bytes // chunk_bytes)
    run_first = run_end = -1
    for offset, length in extents:
        if length <= 0 or offset >= size_bytes:
            continue
        first = offset // chunk_bytes
        end = min((offset + length - 1) // chunk_bytes + 1, total)
        if first <= run_end:
            run_end = max(run_end, end)
            continue
        if run_end > run_first:
            yield run_first, run_end - run_first
        run_first, run_end = first, end
    if run_end > run_first:
        yield run_first, run_end - run_first


def read_groups(
    runs: Iterable[tuple[int, int]], per_read: int, *, max_runs: int = 64
) -> Iterator[list[tuple[int, int]]]:
    """The chunk runs ``(first, count)`` in groups of at most ``per_read`` chunks and
    ``max_runs`` runs (a run longer than ``per_read`` is split): one worker task each, so
    that many small dirty extents cost few tasks and their reads go out together."""
    group: list[tuple[int, int]] = []
    chunks = 0
    for first, count in runs:
        for sub in range(first, first + count, per_read):
            n = min(per_read, first + count - sub)
            if group and (chunks + n > per_read or len(group) == max_runs):
                yield group
                group, chunks = [], 0
            group.append((sub, n))
            chunks += n
    if group:
        yield group


def number_runs(numbers: Iterable[int]) -> Iterator[tuple[int, int]]:
    """``(first, count)`` runs of consecutive numbers in sorted ``numbers``."""
    first = prev = -2
    for n in numbers:
        if n != prev + 1:
            if prev >= 0:
                yield first, prev - first + 1
            first = n
        prev = n
    if prev >= 0:
        yield first, prev - first + 1


def hole_chunks(
    data: Iterable[tuple[int, int]], size: int, chunk_bytes: int
) -> npt.NDArray[np.bool_]:
    """One bool per chunk of a ``size``-byte disk: True for the chunks that lie wholly
    outside the sorted ``data`` regions (in holes: they read as zeros)."""
    count = -(-size // chunk_bytes)
    holes = np.zeros(count, np.bool_)
    at = 0
    for offset, length in [*data, (size, 0)]:
        if offset > at:  # a hole from `at` to `offset`
            holes[-(-at // chunk_bytes) : offset // chunk_bytes if offset < size else count] = True
        at = max(at, offset + length)
    return holes
