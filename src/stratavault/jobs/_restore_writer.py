"""Creating and writing batches of regular files of a restore.

A :class:`FileWriter` takes a batch of files (path below the target and node),
creates each at its final size (holes), then writes their content in pack
order: each thread reads the chunks of one pack with one ranged read and writes
every chunk to all the places that need it, so a chunk is read once per batch
however often it occurs. It runs in the restoring process or in a worker
process (see ``_restore_workers``); it does not know which.
"""

from __future__ import annotations

import resource
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from stratavault.errors import DataDamagedError
from stratavault.jobs._progress import Cancellation
from stratavault.repo import Repository
from stratavault.snapshot import Node
from stratavault.sources import FsRestorer, RestoreFile
from stratavault.types import ChunkId

__all__ = ["BatchResult", "FileWriter", "PlannedBatch", "WriterOptions"]

PlannedBatch = Sequence[tuple[tuple[str, ...], Node]]
"""Regular files to restore: each one's names below the target, and its node."""

ProgressCallback = Callable[[int, int], None]
"""Told ``(bytes written, files finished)`` increments."""


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """How a :class:`FileWriter` works (a part of ``RestoreOptions``)."""

    target: Path
    numeric_owner: bool = False
    verify: bool = False
    ignore_errors: bool = False
    threads: int = 1
    batch_files: int = 1_000
    """The most files of one batch; open descriptors are budgeted for it."""


@dataclass(slots=True)
class BatchResult:
    """What one batch (or a writer's closing) restored, and what went wrong."""

    files: int = 0
    bytes_written: int = 0
    files_verified: int = 0
    issues: list[tuple[str, str]] = field(default_factory=list)
    linkable: list[tuple[str, ...]] = field(default_factory=list)
    """Files created that have more hard links in the snapshot (link sources)."""
    batches: list[int] = field(default_factory=list)
    """Numbers of the batches finished (the first one submitted is 0)."""

    def add(self, other: BatchResult) -> None:
        """Add ``other``'s counts and lists to this one."""
        self.files += other.files
        self.bytes_written += other.bytes_written
        self.files_verified += other.files_verified
        self.issues.extend(other.issues)
        self.linkable.extend(other.linkable)
        self.batches.extend(other.batches)


def _open_file_budget(wanted: int) -> int:
    """How many restored files may stay open: a batch's worth if the descriptor limit
    allows (raising the soft limit up to the hard one), else half the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + 256
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(64, min(wanted, soft // 2))


@dataclass(slots=True)
class _PlannedFile:
    handle: RestoreFile
    node: Node
    parts: tuple[str, ...]
    remaining: int


_Places = dict[ChunkId, list[tuple[_PlannedFile, int]]]
"""Where each chunk of a batch goes: the files and offsets."""


class FileWriter:
    """Restores batches of regular files below ``options.target``.

    ``progress`` is called with ``(bytes, files)`` as data lands and files are
    finished, from the writer's threads. Call :meth:`close` at the end.
    """

    def __init__(
        self,
        repo: Repository,
        options: WriterOptions,
        cancel: Cancellation,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.repo, self.options, self.cancel = repo, options, cancel
        self.progress = progress or _no_progress
        self.fs = FsRestorer(
            options.target,
            numeric_owner=options.numeric_owner,
            max_open_files=_open_file_budget(options.batch_files),
        )
        self.lock = threading.Lock()
        self.result = BatchResult()
        self._issues_seen = 0

    def write(self, batch: PlannedBatch) -> BatchResult:
        """Create, write (and with ``verify`` re-read) every file of ``batch``.

        Raise ``DataDamagedError`` on the first damaged chunk unless
        ``ignore_errors``; failures of single files are issues in the result.
        """
        places: _Places = defaultdict(list)
        planned = [p for parts, node in batch if (p := self._create(parts, node, places))]
        by_pack = self.repo.chunks_by_pack(places)
        with ThreadPoolExecutor(self.options.threads, thread_name_prefix="restore") as pool:
            try:
                for f in [pool.submit(self._write_pack, ids, places) for ids in by_pack.values()]:
                    f.result()
                if self.options.verify:
                    for ok in pool.map(self._verify_file, planned):
                        self.result.files_verified += ok
            except BaseException:
                # Ctrl-C or a failure: queued packs are dropped, running ones stop at the
                # next chunk.
                self.cancel.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return self._take_result()

    def close(self) -> BatchResult:
        """Close the restorer; the result lists what was left unfinished."""
        self.fs.close()
        return self._take_result()

    def _take_result(self) -> BatchResult:
        result, self.result = self.result, BatchResult()
        issues = self.fs.issues
        result.issues[:0] = [(i.path, str(i.error)) for i in issues[self._issues_seen :]]
        self._issues_seen = len(issues)
        return result

    def _create(self, parts: tuple[str, ...], node: Node, places: _Places) -> _PlannedFile | None:
        self.cancel.check()
        handle = self.fs.create_file(parts, node)
        if handle is None:
            return None
        if node.nlink > 1:
            self.result.linkable.append(parts)
        planned = _PlannedFile(handle, node, parts, 0)
        offset = 0
        for cid, length in node.content:
            if cid is not None:
                places[cid].append((planned, offset))
                planned.remaining += 1
            offset += length
        if planned.remaining == 0:
            self._finish(planned)
        return planned

    def _write_pack(self, ids: list[ChunkId], places: _Places) -> None:
        self.cancel.check()
        done: set[ChunkId] = set()
        try:
            for cid, data in self.repo.read_chunks(ids):
                self.cancel.check()
                self._place(cid, data, places)
                done.add(cid)
        except DataDamagedError:
            if not self.options.ignore_errors:
                raise
            self._salvage([c for c in ids if c not in done], places)

    def _salvage(self, ids: list[ChunkId], places: _Places) -> None:
        """``--ignore-errors``: read chunk by chunk; files with an unreadable chunk are
        finished with what could be read and listed as issues."""
        for cid in ids:
            self.cancel.check()
            try:
                data = self.repo.read_chunk(cid)
            except DataDamagedError as exc:
                for planned, _offset in places[cid]:
                    with self.lock:
                        self.result.issues.append(("/".join(planned.parts), f"not restored: {exc}"))
                    self._count_chunk(planned)
                continue
            self._place(cid, data, places)

    def _place(self, cid: ChunkId, data: bytes, places: _Places) -> None:
        """Write one chunk everywhere it belongs; finish files that are complete."""
        written = 0
        for planned, offset in places[cid]:
            written += len(data) if planned.handle.write_at(offset, data) else 0
            self._count_chunk(planned)
        with self.lock:
            self.result.bytes_written += written
        self.progress(written, 0)

    def _count_chunk(self, planned: _PlannedFile) -> None:
        """Count one chunk of a file as handled (written or given up)."""
        with self.lock:
            planned.remaining -= 1
            done = planned.remaining == 0
        if done:
            self._finish(planned)

    def _finish(self, planned: _PlannedFile) -> None:
        """Finish a file all of whose chunks were handled; count it unless writing failed
        (that failure is among the restorer's issues)."""
        self.fs.finish_file(planned.handle)
        if not planned.handle.failed:
            with self.lock:
                self.result.files += 1
            holes = sum(length for cid, length in planned.node.content if cid is None)
            self.progress(holes, 1)  # the total counts them: the bar reaches its end

    def _verify_file(self, planned: _PlannedFile) -> bool:
        stream = _Stream(self.fs.read_back(planned.parts))
        try:
            for cid, length in planned.node.content:
                if cid is None:
                    stream.expect_zeros(length)
                elif self.repo.chunk_id(stream.read(length)) != cid:
                    raise ValueError("content differs from the snapshot")
            if stream.read(1):
                raise ValueError("file is longer than in the snapshot")
        except (OSError, ValueError) as exc:
            with self.lock:
                self.result.issues.append(("/".join(planned.parts), f"verify: {exc}"))
            return False
        return True


def _no_progress(_bytes: int, _files: int) -> None:
    return None


class _Stream:
    """Reads exact lengths from an iterator of blocks."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._buf = b""

    def read(self, length: int) -> bytes:
        parts, have = [self._buf], len(self._buf)
        while have < length:
            block = next(self._blocks, b"")
            if not block:
                break
            parts.append(block)
            have += len(block)
        data = b"".join(parts)
        self._buf = data[length:]
        return data[:length]

    def expect_zeros(self, length: int) -> None:
        while length > 0:
            piece = self.read(min(length, 8 << 20))
            if len(piece) == 0 or piece.count(0) != len(piece):
                raise ValueError("a hole of the snapshot holds data or is missing")
            length -= len(piece)
