"""Use case: restore one disk of a snapshot to a raw or qcow2 file, a device or NBD export.

A new raw file is sparse: zero chunks are never written and stay holes. Data chunks are
read in pack order, one pack per worker thread (one ranged read for neighbouring blobs),
and each is written everywhere the disk holds it. ``onto`` an existing disk with
``changed_only``, the disk's data regions are first read and each chunk hashed with the
repository's keyed chunk id (no download to compare; holes read as zeros), and only
chunks that differ are written (VDR's changed-blocks restore). ``verify`` re-reads the
result and checks every chunk. qcow2 is written as a sparse raw file next to the target
and converted with ``qemu-img``; an NBD export (a URI) is written through NBD, in the
format its server serves.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stratavault._defaults import DISK_FORMATS
from stratavault.errors import RestoreError, SnapshotNotFoundError, UsageError
from stratavault.jobs._disk_ranges import chunk_runs, hole_chunks, is_zero, number_runs
from stratavault.jobs._nbd_disk import NbdDiskTarget, is_nbd_uri
from stratavault.jobs._progress import (
    Cancellation,
    NullProgress,
    Progress,
    ProgressState,
    Ticker,
    now,
)
from stratavault.nbd import connect
from stratavault.repo import Repository
from stratavault.snapshot import DiskIndex, DiskRef, Snapshot, load_disk_index
from stratavault.sources import ImageServer, RawDiskTarget, convert_image, probe_image
from stratavault.types import ChunkId

__all__ = [
    "DISK_FORMATS",
    "DiskTarget",
    "RestoreDiskOptions",
    "RestoreDiskResult",
    "restore_disk",
    "select_disk",
]


@dataclass(frozen=True, slots=True)
class RestoreDiskOptions:
    """Where to restore a disk and how."""

    target: Path | str
    """A new file (``format``), or a block device; with ``onto`` an existing file/device;
    or an NBD export given as a ``nbd://`` / ``nbd+unix://`` URI (a ``str``)."""
    disk: str | None = None
    """Name of the disk; ``None`` when the snapshot has exactly one."""
    format: str = "raw"
    onto: bool = False
    """``target`` is an existing disk to overwrite in place (raw only)."""
    changed_only: bool = False
    """With ``onto``: compare first, write only the chunks that differ."""
    verify: bool = False
    workers: int = 0
    compare_bytes: int = 8 << 20
    """Largest single read of the existing disk when comparing or verifying."""


@dataclass(slots=True)
class RestoreDiskResult:
    """What the restore read, wrote and found."""

    disk: str
    size_bytes: int
    chunks: int = 0
    chunks_written: int = 0
    chunks_zeroed: int = 0
    chunks_unchanged: int = 0
    bytes_written: int = 0
    """Bytes written to the target (data and explicit zeros)."""
    bytes_read: int = 0
    """Bytes read from the existing target to compare (``changed_only``)."""
    bytes_downloaded: int = 0
    """Plaintext bytes of the chunks read from the repository."""
    chunks_verified: int = 0
    bitmap_used: bool = False
    """--changed-only onto an image that still had the snapshot's dirty bitmap: only what it
    marks was written, nothing was read."""
    bitmap_problem: str | None = None
    """Why that bitmap could not be used (then the disk was compared instead)."""
    issues: list[str] = field(default_factory=list)
    """Verification failures, as disk ranges."""


def select_disk(snapshot: Snapshot, name: str | None) -> DiskRef:
    """The disk ``name`` of the snapshot (or its only disk); errors list what there is."""
    names = [d.name for d in snapshot.disks]
    if not snapshot.disks:
        raise UsageError(f"snapshot {snapshot.short_id} has no disks (kind {snapshot.kind!r})")
    if name is None:
        if len(snapshot.disks) > 1:
            raise UsageError(
                f"snapshot {snapshot.short_id} has disks {', '.join(names)}: name one "
                "as SNAPSHOT:DISK"
            )
        return snapshot.disks[0]
    for ref in snapshot.disks:
        if ref.name == name:
            return ref
    raise SnapshotNotFoundError(
        f"snapshot {snapshot.short_id}: no disk {name!r} (it has {', '.join(names)})"
    )


class DiskTarget(Protocol):
    """Where a disk is restored to: a raw file, a block device, an NBD export."""

    fresh: bool
    """Every byte reads as zero already (a new sparse file): zero chunks need no write."""
    write_batch_bytes: int
    """How many bytes of chunks to hand to :meth:`write_ranges` at once (0: each chunk as
    it comes): a file writes neighbours together, NBD keeps several writes in flight."""

    def write_ranges(self, items: Sequence[tuple[int, bytes | memoryview]]) -> None:
        """Write each ``(offset, data)`` (called from several threads); a target that can
        keep several writes in flight (NBD) does."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (called from several threads)."""
        ...

    def data_extents(self) -> list[tuple[int, int]]:
        """The ranges that may hold data; the rest reads as zeros."""
        ...

    def sync(self) -> None:
        """Make what was written durable."""
        ...


class _DiskRestore:
    def __init__(
        self,
        repo: Repository,
        index: DiskIndex,
        target: DiskTarget,
        options: RestoreDiskOptions,
        progress: Progress,
        cancel: Cancellation,
    ) -> None:
        self.repo, self.index, self.target, self.options = repo, index, target, options
        self.progress, self.cancel = progress, cancel
        self.result = RestoreDiskResult(index.name, index.size_bytes, chunks=index.chunk_count)
        self.state = ProgressState(phase="restore", started=now())
        self.lock = threading.Lock()
        workers = options.workers or max(2, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="disk-restore")

    def pieces(self, runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """``runs`` of chunks cut into reads of at most ``compare_bytes``."""
        per = max(1, self.options.compare_bytes // self.index.chunk_bytes)
        for first, count in runs:
            for sub in range(first, first + count, per):
                yield sub, min(per, first + count - sub)

    def differing(self, *, trust_bitmap: bool = True) -> npt.NDArray[np.bool_]:
        """One bool per chunk: True where the target differs from the snapshot.

        With ``trust_bitmap``, a target that has a dirty bitmap since the snapshot is
        taken at its word (nothing is read). Otherwise only the target's data regions are
        read (in threads) and hashed; a chunk in a hole of the target reads as zeros, so
        it differs exactly when the snapshot has data there.
        """
        size, count = self.index.chunk_bytes, self.index.chunk_count
        changed = getattr(self.target, "changed", None) if trust_bitmap else None
        if changed is not None:  # a dirty bitmap since this snapshot: read nothing
            # ... but what a shrink cut off and a grow gave back (zeros) is not in it
            holes = hole_chunks(self.target.data_extents(), self.index.size_bytes, size)
            differ = holes & self.index.data_mask()
            for first, n in chunk_runs(changed, self.index.size_bytes, size):
                differ[first : first + n] = True
            return differ
        extents = self.target.data_extents()
        readable = list(chunk_runs(extents, self.index.size_bytes, size))
        differ = self.index.data_mask()
        for first, n in readable:
            differ[first : first + n] = False

        def one(first: int, n: int) -> list[int]:
            self.cancel.check()
            start = first * size
            view = memoryview(
                self.target.read(start, self.index.chunk_range(first + n - 1)[1] - start)
            )
            with self.lock:
                self.state.bytes_done += len(view)
                self.result.bytes_read += len(view)
            return [
                first + i
                for i in range(n)
                if not self.same(first + i, view[i * size : (i + 1) * size])
            ]

        futures = [self.pool.submit(one, first, n) for first, n in self.pieces(readable)]
        for f in futures:
            differ[f.result()] = True
        assert len(differ) == count
        return differ

    def same(self, number: int, data: memoryview) -> bool:
        """Whether ``data`` is what the snapshot holds for chunk ``number``."""
        cid = self.index.get(number)
        return is_zero(data) if cid is None else self.repo.chunk_id(data) == cid

    def plan(self) -> tuple[dict[ChunkId, list[int]], list[int]]:
        """Where each chunk goes, and which chunks to zero (none on a new sparse file)."""
        mask = self.index.data_mask()
        if self.options.changed_only:
            self.state.phase, self.state.bytes_total = "compare", self.index.size_bytes
            differ = self.differing()
            self.result.chunks_unchanged = self.index.chunk_count - int(differ.sum())
        else:
            differ = np.ones(self.index.chunk_count, np.bool_)
        places: dict[ChunkId, list[int]] = defaultdict(list)
        for number in np.flatnonzero(differ & mask):
            places[ChunkId(self.index.ids[number].tobytes())].append(int(number))
        zeros = [] if self.target.fresh else np.flatnonzero(differ & ~mask).tolist()
        return places, zeros

    def write(self, places: dict[ChunkId, list[int]], zeros: list[int]) -> None:
        """Zero what must be zero (in runs), then write the data chunks in pack order."""
        self.state.phase, self.state.bytes_done = "restore", 0
        self.state.bytes_total = sum(len(v) for v in places.values()) * self.index.chunk_bytes
        for first, count in number_runs(zeros):
            start = self.index.chunk_range(first)[0]
            self.target.zero(start, self.index.chunk_range(first + count - 1)[1] - start)
        self.result.chunks_zeroed = len(zeros)
        by_pack = self.repo.chunks_by_pack(places)
        futures = [self.pool.submit(self.write_pack, ids, places) for ids in by_pack.values()]
        for f in futures:
            f.result()

    def write_pack(self, ids: list[ChunkId], places: dict[ChunkId, list[int]]) -> None:
        """Write the chunks ``ids`` of one pack everywhere they go, handing the target up
        to ``write_batch_bytes`` at once."""
        self.cancel.check()
        batch: list[tuple[int, bytes | memoryview]] = []
        downloaded = 0
        for cid, data in self.repo.read_chunks(ids):
            self.cancel.check()
            batch += [(self.index.chunk_range(number)[0], data) for number in places[cid]]
            downloaded += len(data)
            if len(batch) * self.index.chunk_bytes >= self.target.write_batch_bytes:
                self._write_batch(batch, downloaded)
                batch, downloaded = [], 0
        self._write_batch(batch, downloaded)

    def _write_batch(self, batch: list[tuple[int, bytes | memoryview]], downloaded: int) -> None:
        if not batch:
            return
        self.target.write_ranges(batch)
        with self.lock:
            written = sum(len(data) for _, data in batch)
            self.result.bytes_downloaded += downloaded
            self.result.bytes_written += written
            self.result.chunks_written += len(batch)
            self.state.bytes_done += written
        self.progress.update(self.state)  # the receiver throttles

    def verify(self) -> None:
        self.state.phase, self.state.bytes_done = "verify", 0
        self.state.bytes_total = self.index.size_bytes
        read_before = self.result.bytes_read
        for number in np.flatnonzero(self.differing(trust_bitmap=False)):  # read it all back
            start, end = self.index.chunk_range(int(number))
            self.result.issues.append(
                f"verify: disk {self.index.name} bytes {start}-{end} differ from the snapshot"
            )
        self.result.chunks_verified = self.index.chunk_count
        self.result.bytes_read = read_before  # bytes_read counts the comparison only

    def run(self) -> None:
        try:
            with Ticker(self.progress, self.state):
                places, zeros = self.plan()
                self.write(places, zeros)
                self.target.sync()
                if self.options.verify:
                    self.verify()
        except BaseException:
            self.cancel.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            raise
        self.pool.shutdown(wait=True)


def _check_options(options: RestoreDiskOptions) -> None:
    if options.format not in DISK_FORMATS:
        raise UsageError(f"disk format {options.format!r}: expected one of {DISK_FORMATS}")
    if options.changed_only and not options.onto:
        raise UsageError("--changed-only needs --onto EXISTING")
    if isinstance(options.target, str):
        if not is_nbd_uri(options.target):
            raise UsageError(f"restore target {options.target!r}: not an nbd:// URI")
        if options.format != "raw":
            raise UsageError("an NBD export has the server's format: leave out --format")
        return
    if options.onto and options.format != "raw":
        raise UsageError("--onto keeps the existing disk's format: leave out --format")
    if options.onto and not options.target.exists():
        raise UsageError(f"--onto {options.target}: no such file or device")


def restore_disk(
    repo: Repository,
    snapshot: Snapshot,
    options: RestoreDiskOptions,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> RestoreDiskResult:
    """Restore one disk of ``snapshot`` to ``options.target``; return what was done.

    Verification failures are listed in ``result.issues``. A failed or cancelled restore
    to a new file or image removes what it created.
    """
    _check_options(options)
    progress = progress or NullProgress()
    with repo.lock(exclusive=False):
        ref = select_disk(snapshot, options.disk)
        index = load_disk_index(repo, ref)
        if isinstance(options.target, str):
            with NbdDiskTarget(options.target, index.size_bytes) as nbd:
                run = _DiskRestore(repo, index, nbd, options, progress, cancel or Cancellation())
                run.run()
        elif options.onto and (fmt := _image_format(options.target)) is not None:
            run = _restore_onto_image(repo, ref, index, fmt, options, progress, cancel)
        else:
            run = _restore_to_file(repo, index, options.target, options, progress, cancel)
    progress.done(run.state)
    return run.result


def _image_format(path: Path) -> str | None:
    """The format of an existing image file other than raw (qcow2, vmdk...), else None.
    ``RestoreError`` for one whose descriptor names other files as extents (vmdk): they
    would be written, and a guest can write such a descriptor into its raw disk."""
    if not path.is_file():
        return None
    info = probe_image(path)
    if info.format != "raw" and info.extents:
        raise RestoreError(
            f"restoring onto {path} - it reads as {info.format} naming "
            f"{', '.join(info.extents)}: writing would change those files"
        )
    return None if info.format == "raw" else info.format


def _restore_onto_image(
    repo: Repository,
    ref: DiskRef,
    index: DiskIndex,
    fmt: str,
    options: RestoreDiskOptions,
    progress: Progress,
    cancel: Cancellation | None,
) -> _DiskRestore:
    """Onto an existing qcow2 (or other format) through qemu-storage-daemon. With
    ``changed_only``, when the image still has the bitmap the snapshot recorded (a stopped
    VM's disk since that backup), only what it marks is written and nothing is read."""
    bitmap = ref.bitmap if options.changed_only and ref.bitmap else None
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-onto-", dir="/tmp"))
        server = stack.enter_context(ImageServer(options.target, scratch, fmt=fmt, bitmap=bitmap))
        with connect(server.uri) as probe:
            _same_size(options.target, probe.size, index.size_bytes)
        nbd = stack.enter_context(NbdDiskTarget(server.uri, index.size_bytes))
        if server.bitmap_context is not None:
            with connect(server.uri, meta_contexts=[server.bitmap_context]) as client:
                extents = client.extents(server.bitmap_context)
                nbd.changed = [(e.offset, e.length) for e in extents if e.flags & 1]
        run = _DiskRestore(repo, index, nbd, options, progress, cancel or Cancellation())
        run.result.bitmap_used = server.bitmap_context is not None
        run.result.bitmap_problem = server.bitmap_problem
        run.run()
    return run


def _same_size(image: Path | str, size: int, wanted: int) -> None:
    """An image restored onto must have the disk's size: a larger one would keep old data
    past the end (a raw file is resized instead; an image is left to the user)."""
    if size != wanted:
        shrink = " --shrink" if size > wanted else ""
        raise RestoreError(
            f"restoring disk onto {image} - the image has {size} bytes, the snapshot's disk "
            f"{wanted}: resize it first (qemu-img resize{shrink} {image} {wanted})"
        )


def _restore_to_file(
    repo: Repository,
    index: DiskIndex,
    path: Path,
    options: RestoreDiskOptions,
    progress: Progress,
    cancel: Cancellation | None,
) -> _DiskRestore:
    """A raw file or device directly; another format through a raw file and qemu-img."""
    raw_path = path
    if options.format != "raw":
        if path.exists():
            raise RestoreError(f"restoring disk to {path} - it exists")
        raw_path = path.with_name(f".{path.name}.raw.tmp")
    created = options.format != "raw" or not (options.onto or path.exists())
    try:
        with RawDiskTarget(raw_path, index.size_bytes, create=not options.onto) as target:
            run = _DiskRestore(repo, index, target, options, progress, cancel or Cancellation())
            run.run()
        if options.format != "raw":
            convert_image(raw_path, path, options.format)
    except BaseException:
        if created:
            for each in {raw_path, path}:
                each.unlink(missing_ok=True)
        raise
    finally:
        if raw_path != path:
            raw_path.unlink(missing_ok=True)
    return run
