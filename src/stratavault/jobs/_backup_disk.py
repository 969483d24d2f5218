"""Use case: back up disks (image files, block devices, a VM's exports) into a snapshot.

Each disk is cut into fixed-size chunks aligned to its start. Only chunks that the
source's extents touch are read; large aligned runs of them are read in worker threads
(``pread`` and the native hash, zstd and AES release the GIL), zero chunks become
markers, and other chunks go through :meth:`Repository.add_chunk`, which stores only
new ones. When the source lists only what changed since the parent snapshot (a dirty
bitmap), every other chunk keeps the parent's entry: the new disk index is complete
(incremental forever).
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stratavault import __version__
from stratavault._defaults import DEFAULT_DISK_CHUNK_BYTES, DEFAULT_DISK_FRAME_BYTES
from stratavault.errors import SourceError, UsageError
from stratavault.jobs._disk_ranges import chunk_runs, hole_chunks, is_zero, read_groups
from stratavault.jobs._progress import (
    Cancellation,
    NullProgress,
    Progress,
    ProgressState,
    Ticker,
    now,
)
from stratavault.repo import Repository
from stratavault.snapshot import (
    DiskIndex,
    DiskRef,
    FileError,
    Snapshot,
    SnapshotSummary,
    find_snapshot,
    latest,
    load_disk_index,
    load_snapshots,
    save_disk_index,
    save_snapshot,
)
from stratavault.types import BlobKind, ChunkId

__all__ = [
    "DEFAULT_DISK_CHUNK_BYTES",
    "DISK_KINDS",
    "MAX_DISK_CHUNKS",
    "BackupDisksOptions",
    "DiskSource",
    "backup_disks",
    "chunk_runs",
    "is_zero",
    "latest_disk_snapshot",
    "new_disk_chunk_bytes",
    "read_groups",
]

"""Default disk chunk size: see docs/format.md ("Disk indexes") for the measurement."""
BITMAP_GRANULARITY_BYTES = 64 << 10
"""QEMU's default dirty-bitmap granularity; chunk sizes are multiples of it."""
DISK_KINDS = ("image", "vm")
"""Snapshot kinds that hold disks."""


class DiskSource(Protocol):
    """A disk to back up: a raw image, a block device, an NBD export of a VM's disk."""

    name: str
    """The disk's name in the snapshot ("vda", "disk.img"); unique within a snapshot."""
    size_bytes: int
    dirty_only: bool
    """True when :meth:`extents` lists only what changed since the parent snapshot's disk
    of the same name (a dirty bitmap); False when it lists every region that may hold
    data (the rest reads as zeros)."""

    def extents(self) -> Iterable[tuple[int, int]]:
        """``(offset, length)`` regions to read, sorted and not overlapping."""
        ...

    def data_regions(self) -> Iterable[tuple[int, int]]:
        """``(offset, length)`` regions that may hold data now, sorted; the rest reads as
        zeros. With ``dirty_only``, a chunk the parent has data in that now lies wholly in
        such a hole is zeros in the new snapshot: a bitmap does not record a shrink
        followed by a grow."""
        ...

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes | bytearray]:
        """Exactly the bytes of each ``(offset, length)``, in order; called from several
        threads at once (an NBD source needs a connection per thread, or a lock). A source
        that can keep several reads in flight (NBD) does: a dirty bitmap gives many small
        extents."""
        ...

    def changed(self) -> bool:
        """True when the disk was written while it was read, so the backup may be
        inconsistent (the snapshot is then saved as incomplete); False for a frozen view
        (fleecing, a stopped image)."""
        ...


@dataclass(frozen=True, slots=True)
class BackupDisksOptions:
    """How to back up disks."""

    tags: tuple[str, ...] = ()
    host: str = field(default_factory=socket.gethostname)
    paths: tuple[str, ...] = ()
    """What the snapshot is of (image paths, a VM name); also selects the parent."""
    kind: str = "image"
    """"image" or "vm"."""
    parent: str | None = None
    """Snapshot id (prefix) of the parent; ``None``: the latest disk snapshot of the same
    host and paths. Sources with ``dirty_only`` are relative to this parent."""
    chunk_bytes: int = DEFAULT_DISK_CHUNK_BYTES
    """Chunk size of new disks, larger for a disk of more than :data:`MAX_DISK_CHUNKS`
    chunks (see :func:`new_disk_chunk_bytes`); an incremental keeps its parent's."""
    compression_level: int = 3
    frame_bytes: int = DEFAULT_DISK_FRAME_BYTES
    """New neighbouring chunks are compressed together in frames of up to this many bytes
    (one chunk per blob when it is at most the chunk size); see docs/format.md."""
    workers: int = 0
    """Threads reading and storing chunks (0: one per core)."""
    read_bytes: int = 8 << 20
    """Largest single read: runs of adjacent chunks are read in pieces of this size."""
    vm_config: dict[str, Any] | None = None


MAX_DISK_CHUNKS = 1 << 22
"""A new disk has at most this many chunks: its index takes 32 bytes a chunk in memory
(at most 128 MiB), so a disk larger than 256 GiB gets chunks larger than 64 KiB."""


def new_disk_chunk_bytes(size_bytes: int, chunk_bytes: int) -> int:
    """The chunk size of a new disk of ``size_bytes``: ``chunk_bytes``, doubled until the
    disk has at most :data:`MAX_DISK_CHUNKS` chunks (up to 64 MiB)."""
    while -(-size_bytes // chunk_bytes) > MAX_DISK_CHUNKS and chunk_bytes < 64 << 20:
        chunk_bytes *= 2
    return chunk_bytes


def _check_chunk_bytes(chunk_bytes: int) -> None:
    ok = chunk_bytes >= BITMAP_GRANULARITY_BYTES and chunk_bytes & (chunk_bytes - 1) == 0
    if not ok or chunk_bytes > 64 << 20:
        raise UsageError(
            f"disk chunk size {chunk_bytes}: must be a power of two from 64 KiB to 64 MiB"
        )


@dataclass(slots=True)
class _Piece:
    """What a worker found in one read: ``(chunk number, id or None)`` per chunk."""

    chunks: list[tuple[int, ChunkId | None]]
    bytes_read: int = 0
    chunks_added: int = 0
    bytes_stored: int = 0


class _DiskRun:
    """One backup run over several disks, sharing one pool of worker threads."""

    def __init__(
        self,
        repo: Repository,
        options: BackupDisksOptions,
        progress: Progress,
        cancel: Cancellation,
    ) -> None:
        self.repo, self.options, self.progress, self.cancel = repo, options, progress, cancel
        self.workers = options.workers or (os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="disk-backup")
        self.summary = SnapshotSummary()
        self.errors: list[FileError] = []
        self.state = ProgressState(phase="backup", started=now())

    def read_piece(
        self, source: DiskSource, index: DiskIndex, runs: list[tuple[int, int]]
    ) -> _Piece:
        """Read the chunk runs ``(first, count)`` (one read each, all at once) and store
        the new chunks."""
        self.cancel.check()
        ranges = []
        for first, count in runs:
            start = first * index.chunk_bytes
            ranges.append(
                (start, min((first + count) * index.chunk_bytes, index.size_bytes) - start)
            )
        piece = _Piece([])
        for (first, count), (start, length), data in zip(
            runs, ranges, source.read_ranges(ranges), strict=True
        ):
            if len(data) != length:
                raise SourceError(f"reading disk {source.name} at {start} - short read")
            piece.bytes_read += length
            self._store_run(piece, index, first, count, memoryview(data))
        return piece

    def _store_run(
        self, piece: _Piece, index: DiskIndex, first: int, count: int, view: memoryview
    ) -> None:
        """Cut ``view`` (chunks ``first .. first+count-1``) into chunks and store the new
        ones, neighbours compressed together in frames."""
        per_frame = max(1, self.options.frame_bytes // index.chunk_bytes)
        frame: list[tuple[ChunkId, memoryview]] = []
        for i in range(count):
            chunk = view[i * index.chunk_bytes : (i + 1) * index.chunk_bytes]
            if is_zero(chunk):
                self._store(frame, piece)
                piece.chunks.append((first + i, None))
                continue
            cid = self.repo.chunk_id(chunk)
            piece.chunks.append((first + i, cid))
            frame.append((cid, chunk))
            if len(frame) == per_frame:
                self._store(frame, piece)
        self._store(frame, piece)

    def _store(self, frame: list[tuple[ChunkId, memoryview]], piece: _Piece) -> None:
        """Store the new ones of ``frame``'s neighbouring chunks together; empty ``frame``."""
        if frame:
            level = self.options.compression_level
            added, stored = self.repo.add_chunks(frame, BlobKind.DATA, level=level)
            piece.chunks_added += added
            piece.bytes_stored += stored
            frame.clear()

    def take(self, future: Future[_Piece], index: DiskIndex) -> None:
        piece = future.result()
        for number, cid in piece.chunks:
            index.put(number, cid)
        self.summary.bytes_read += piece.bytes_read
        self.state.bytes_done += piece.bytes_read
        self.summary.chunks_added += piece.chunks_added
        self.summary.bytes_added_stored += piece.bytes_stored

    def back_up(self, source: DiskSource, index: DiskIndex, runs: list[tuple[int, int]]) -> None:
        """Read the chunks of ``runs`` into ``index``, a bounded number in flight."""
        per_read = max(1, self.options.read_bytes // index.chunk_bytes)
        pending: deque[Future[_Piece]] = deque()
        self.state.current = source.name
        for group in read_groups(runs, per_read):
            self.cancel.check()
            pending.append(self.pool.submit(self.read_piece, source, index, group))
            if len(pending) >= 2 * self.workers:
                self.take(pending.popleft(), index)
        while pending:
            self.take(pending.popleft(), index)
        self.state.files_done += 1

    def shutdown(self, *, cancel: bool) -> None:
        if cancel:
            self.cancel.cancel()
        self.pool.shutdown(wait=True, cancel_futures=cancel)


def _pick_parent(
    repo: Repository, options: BackupDisksOptions, paths: list[str]
) -> Snapshot | None:
    if options.parent:  # only this one is read (image and VM backups name their parent)
        found = find_snapshot(repo, options.parent)
        if found.kind not in DISK_KINDS:
            raise UsageError(f"parent snapshot {options.parent}: not a disk snapshot")
        return found
    return latest_disk_snapshot(repo, options.host, paths)


def latest_disk_snapshot(repo: Repository, host: str, paths: list[str]) -> Snapshot | None:
    """The latest complete disk snapshot of the same host and paths (damaged ones skipped)."""
    snaps = [
        s
        for s in load_snapshots(repo, damaged=[])
        if s.kind in DISK_KINDS and s.host == host and sorted(s.paths) == sorted(paths)
    ]
    return latest(snaps) if snaps else None


def _snapshot_paths(options: BackupDisksOptions, sources: Sequence[DiskSource]) -> list[str]:
    """What the snapshot is of: the given paths, else the disk names."""
    return list(options.paths) or [s.name for s in sources]


def _plan(
    repo: Repository, source: DiskSource, parent: DiskRef | None, chunk_bytes: int
) -> tuple[DiskIndex, list[tuple[int, int]]]:
    """The new disk's index (the parent's entries where they stay valid) and the chunk
    runs to read."""
    if not source.dirty_only or parent is None:
        if source.dirty_only:
            raise SourceError(
                f"backing up disk {source.name} - only changed extents are known, but the "
                "parent snapshot has no disk of that name: read all allocated extents instead"
            )
        chunk_bytes = new_disk_chunk_bytes(source.size_bytes, chunk_bytes)
        index = DiskIndex(source.name, source.size_bytes, chunk_bytes)
        return index, list(chunk_runs(source.extents(), source.size_bytes, chunk_bytes))
    old = load_disk_index(repo, parent)
    index = DiskIndex(source.name, source.size_bytes, old.chunk_bytes)
    index.copy_from(old)
    extents = list(source.extents())
    # Data in the parent where the disk is a hole now: cut off by a shrink and grown
    # again, which no dirty bitmap records. Those chunks read as zeros.
    holes = hole_chunks(source.data_regions(), index.size_bytes, index.chunk_bytes)
    for number in np.flatnonzero(holes & index.data_mask()).tolist():
        index.put(number, None)
    if source.size_bytes != old.size_bytes:  # resized: read what the parent did not have whole
        tail = min(source.size_bytes, old.size_bytes) // old.chunk_bytes * old.chunk_bytes
        extents.append((tail, source.size_bytes - tail))
    numbers, keys = index.data_ids()
    for number in numbers[~repo.present_chunks(keys)].tolist():
        start, end = index.chunk_range(number)  # removed since (damaged and repaired)
        extents.append((start, end - start))  # read it again
        index.put(number, None)
    extents.sort()
    return index, list(chunk_runs(extents, source.size_bytes, old.chunk_bytes))


def backup_disks(
    repo: Repository,
    sources: Sequence[DiskSource],
    options: BackupDisksOptions,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Snapshot:
    """Back up ``sources`` (one snapshot holding all of them) and return the snapshot.

    On failure or cancellation the chunks stored so far are indexed (the next backup
    reuses them) and no snapshot is written (``Interrupted`` on Ctrl-C).
    """
    _check_chunk_bytes(options.chunk_bytes)
    names = [s.name for s in sources]
    if not sources or len(set(names)) != len(names):
        raise UsageError(f"backing up disks {names}: give at least one disk, names unique")
    progress = progress or NullProgress()
    run = _DiskRun(repo, options, progress, cancel or Cancellation())
    started, t0 = clock(), now()
    with repo.lock(exclusive=False):
        repo.recover_unindexed_packs()
        parent = _pick_parent(repo, options, _snapshot_paths(options, sources))
        try:
            with Ticker(progress, run.state):
                snapshot = _run_and_save(run, sources, parent, started, t0)
        except BaseException as exc:
            run.shutdown(cancel=True)
            repo.settle(exc)
            raise
    progress.done(run.state)
    return snapshot


def _run_and_save(
    run: _DiskRun,
    sources: Sequence[DiskSource],
    parent: Snapshot | None,
    started: dt.datetime,
    t0: float,
) -> Snapshot:
    old = {d.name: d for d in parent.disks} if parent is not None else {}
    plans = [_plan(run.repo, s, old.get(s.name), run.options.chunk_bytes) for s in sources]
    run.state.files_total = len(sources)
    run.state.bytes_total = sum(
        min(count * index.chunk_bytes, index.size_bytes)
        for index, runs in plans
        for _first, count in runs
    )
    refs = []
    for source, (index, runs) in zip(sources, plans, strict=True):
        run.back_up(source, index, runs)
        run.summary.bytes_processed += source.size_bytes
        path, bitmap = str(getattr(source, "path", "")), str(getattr(source, "bitmap", ""))
        refs.append(save_disk_index(run.repo, index, path=path, bitmap=bitmap))
        if source.changed():
            run.errors.append(FileError(source.name, "disk changed while it was read"))
            run.progress.warn(f"disk {source.name}: changed while it was read")
    run.shutdown(cancel=False)
    run.repo.flush()  # the last pack and the index are part of the time taken
    run.summary.duration_s = round(now() - t0, 3)
    snapshot = Snapshot(
        time=started,
        host=run.options.host,
        user=getpass.getuser(),
        paths=_snapshot_paths(run.options, sources),
        tree=None,
        kind=run.options.kind,
        tags=list(run.options.tags),
        parent=parent.id if parent else None,
        summary=run.summary,
        errors=run.errors,
        program_version=__version__,
        disks=refs,
        vm_config=run.options.vm_config,
    )
    run.cancel.check()
    save_snapshot(run.repo, snapshot)
    return snapshot
