"""Use case: restore a file snapshot (or part of it) into a target folder.

The tree is walked once to create folders, links and special files and to open
regular files at their final size (holes). Their content is then written in
pack order: each worker reads the chunks of one pack with one ranged read and
writes every chunk to all the places that need it, so each chunk is read once
however often it occurs. Work runs in batches of bounded size, so memory does
not grow with the snapshot. ``--verify`` re-reads every restored file and checks
it against the chunk ids in the snapshot.
"""

from __future__ import annotations

import os
import resource
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from stratavault.errors import DataDamagedError
from stratavault.jobs._progress import (
    Cancellation,
    NullProgress,
    Progress,
    ProgressState,
    Ticker,
    now,
)
from stratavault.repo import Repository
from stratavault.snapshot import Node, NodeType, Snapshot, load_tree, resolve_path
from stratavault.sources import ExcludeMatcher, FsRestorer, RestoreFile
from stratavault.types import ChunkId

__all__ = ["RestoreOptions", "RestoreResult", "restore_files"]


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """Where and what to restore."""

    target: Path
    path: str = "/"
    """Folder or file in the snapshot; a folder's contents land directly in ``target``."""
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    verify: bool = False
    ignore_errors: bool = False
    """Restore what can be read when chunks are damaged, listing the files that are not
    complete; otherwise the first damaged chunk stops the restore (exit 12)."""
    numeric_owner: bool = False
    workers: int = 0
    batch_bytes: int = 256 << 20
    batch_files: int = 4_000


@dataclass(slots=True)
class RestoreResult:
    """What was restored, and what could not be."""

    files: int = 0
    dirs: int = 0
    others: int = 0
    bytes_written: int = 0
    files_verified: int = 0
    issues: list[tuple[str, str]] = field(default_factory=list)


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


class _Batch:
    """Files whose content is still to be written, and where each chunk goes."""

    def __init__(self) -> None:
        self.places: dict[ChunkId, list[tuple[_PlannedFile, int]]] = defaultdict(list)
        self.files: list[_PlannedFile] = []
        self.size_bytes = 0


class _Restore:
    def __init__(
        self,
        repo: Repository,
        snapshot: Snapshot,
        options: RestoreOptions,
        progress: Progress,
        cancel: Cancellation,
    ) -> None:
        self.repo, self.snapshot, self.options = repo, snapshot, options
        self.progress, self.cancel = progress, cancel
        self.includes = ExcludeMatcher(options.includes)
        self.excludes = ExcludeMatcher(options.excludes)
        self.fs = FsRestorer(
            options.target,
            numeric_owner=options.numeric_owner,
            max_open_files=_open_file_budget(options.batch_files),
        )
        self.result = RestoreResult()
        self.state = ProgressState(phase="restore", started=now())
        self.lock = threading.Lock()
        self.batch = _Batch()
        self.links: dict[tuple[int, int], tuple[str, ...]] = {}
        self.created_dirs: set[tuple[str, ...]] = set()
        self.to_verify: list[_PlannedFile] = []
        """Files of the current batch to re-read (``--verify``); emptied per batch."""
        self.workers = options.workers or max(2, os.cpu_count() or 1)

    # -- the walk ------------------------------------------------------------
    def walk(
        self,
        tree: ChunkId,
        base: str,
        parts: tuple[str, ...],
        ancestors: list[tuple[tuple[str, ...], Node]],
        included: bool,
    ) -> None:
        for node in load_tree(self.repo, tree):
            self.cancel.check()
            path, sub = f"{base}/{node.name}", (*parts, node.name)
            is_dir = node.type == NodeType.DIR
            if self.excludes and self.excludes.excluded(path, is_dir=is_dir):
                continue
            inside = included or not self.includes or self.includes.excluded(path, is_dir=is_dir)
            if is_dir:
                if inside:
                    self.ensure_dirs(ancestors)
                    self.make_dir(sub, node)
                if node.subtree is not None:
                    self.walk(node.subtree, path, sub, [*ancestors, (sub, node)], inside)
            elif inside:
                self.ensure_dirs(ancestors)
                self.add_entry(sub, node)

    def ensure_dirs(self, ancestors: list[tuple[tuple[str, ...], Node]]) -> None:
        for parts, node in ancestors:
            if parts not in self.created_dirs:
                self.make_dir(parts, node)

    def make_dir(self, parts: tuple[str, ...], node: Node) -> None:
        if self.fs.make_dir(parts, node):
            self.result.dirs += 1
        self.created_dirs.add(parts)

    def add_entry(self, parts: tuple[str, ...], node: Node) -> None:
        key = (node.dev, node.inode)
        if node.type != NodeType.DIR and node.nlink > 1 and key in self.links:
            if self.fs.make_hardlink(parts, self.links[key]):
                self.result.others += node.type != NodeType.FILE
                self.result.files += node.type == NodeType.FILE
            return
        if node.nlink > 1:
            self.links[key] = parts
        if node.type == NodeType.FILE:
            self.add_file(parts, node)
        elif self.fs.make_entry(parts, node):
            self.result.others += 1

    def add_file(self, parts: tuple[str, ...], node: Node) -> None:
        handle = self.fs.create_file(parts, node)
        if handle is None:
            return
        self.result.files += 1
        planned = _PlannedFile(handle, node, parts, 0)
        offset = 0
        for cid, length in node.content:
            if cid is not None:
                self.batch.places[cid].append((planned, offset))
                planned.remaining += 1
            offset += length
        if self.options.verify:
            self.to_verify.append(planned)
        if planned.remaining == 0:
            self.fs.finish_file(handle)
            return
        self.batch.files.append(planned)
        self.batch.size_bytes += node.size
        if (
            self.batch.size_bytes >= self.options.batch_bytes
            or len(self.batch.files) >= self.options.batch_files
        ):
            self.write_batch()

    # -- content -------------------------------------------------------------
    def write_batch(self) -> None:
        batch, self.batch = self.batch, _Batch()
        by_pack: dict[str, list[ChunkId]] = defaultdict(list)
        for cid in batch.places:
            by_pack[self.repo.chunk_info(cid).pack].append(cid)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="restore") as pool:
            try:
                for f in [pool.submit(self.write_pack, ids, batch) for ids in by_pack.values()]:
                    f.result()
                verify, self.to_verify = self.to_verify, []
                for ok in pool.map(self.verify_file, verify):
                    self.result.files_verified += ok
            except BaseException:
                # Ctrl-C or a failure: queued packs are dropped, running ones stop at the
                # next chunk.
                self.cancel.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def write_pack(self, ids: list[ChunkId], batch: _Batch) -> None:
        self.cancel.check()
        done: set[ChunkId] = set()
        try:
            for cid, data in self.repo.read_chunks(ids):
                self.cancel.check()
                self.place(cid, data, batch)
                done.add(cid)
        except DataDamagedError:
            if not self.options.ignore_errors:
                raise
            self.salvage([c for c in ids if c not in done], batch)

    def salvage(self, ids: list[ChunkId], batch: _Batch) -> None:
        """``--ignore-errors``: read chunk by chunk; files with an unreadable chunk are
        finished with what could be read and listed as issues."""
        for cid in ids:
            self.cancel.check()
            try:
                data = self.repo.read_chunk(cid)
            except DataDamagedError as exc:
                for planned, _offset in batch.places[cid]:
                    with self.lock:
                        self.result.issues.append(("/".join(planned.parts), f"not restored: {exc}"))
                    self.place_missing(planned)
                continue
            self.place(cid, data, batch)

    def place(self, cid: ChunkId, data: bytes, batch: _Batch) -> None:
        """Write one chunk everywhere it belongs; finish files that are complete."""
        for planned, offset in batch.places[cid]:
            planned.handle.write_at(offset, data)
            with self.lock:
                self.state.bytes_done += len(data)
                self.result.bytes_written += len(data)
            self.place_missing(planned)
        self.progress.update(self.state)

    def place_missing(self, planned: _PlannedFile) -> None:
        """Count one chunk of a file as handled (written or given up)."""
        with self.lock:
            planned.remaining -= 1
            done = planned.remaining == 0
        if done:
            self.fs.finish_file(planned.handle)
            with self.lock:
                self.state.files_done += 1

    # -- verification --------------------------------------------------------
    def verify_file(self, planned: _PlannedFile) -> bool:
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


def restore_files(
    repo: Repository,
    snapshot: Snapshot,
    options: RestoreOptions,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> RestoreResult:
    """Restore ``options.path`` of ``snapshot`` below ``options.target``.

    Entries that fail are listed in ``result.issues``; the restore goes on. No name
    in the snapshot can make it write outside the target.
    """
    run = _Restore(repo, snapshot, options, progress or NullProgress(), cancel or Cancellation())
    where, node = resolve_path(repo, snapshot, options.path)
    base = "" if where == "/" else where
    if snapshot.summary.bytes_processed and where == "/" and not options.includes:
        run.state.bytes_total = snapshot.summary.bytes_processed
    try:
        with repo.lock(exclusive=False), Ticker(run.progress, run.state):
            if node is None or node.type == NodeType.DIR:
                tree = snapshot.tree if node is None else node.subtree
                if tree is not None:
                    run.walk(tree, base, (), [], False)
            else:
                run.add_entry((node.name,), node)
            run.write_batch()
    finally:
        issues = run.fs.close()
    run.result.issues[:0] = [(i.path, str(i.error)) for i in issues]
    run.progress.done(run.state)
    return run.result
