"""Use case: restore a file snapshot (or part of it) into a target folder.

The tree is walked once. The walk creates folders, symbolic links and special
files itself and gathers regular files into batches of bounded size, which
worker processes create and write (``_restore_workers``, ``_restore_writer``).
Hard links are made at the end, once their sources exist. A folder gets its
metadata once the walk has left it and its files are written (the rest at the end,
deepest first), so memory does not grow with the snapshot.
``--verify`` re-reads every restored file and checks it against the chunk ids
in the snapshot.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from stratavault.jobs._progress import (
    Cancellation,
    NullProgress,
    Progress,
    ProgressState,
    Ticker,
    now,
)
from stratavault.jobs._restore_workers import Writers, start_writers
from stratavault.jobs._restore_writer import BatchResult, WriterOptions
from stratavault.repo import Repository
from stratavault.snapshot import Node, NodeType, Snapshot, load_tree, resolve_path
from stratavault.sources import ExcludeMatcher, FsRestorer
from stratavault.types import ChunkId

__all__ = ["RestoreOptions", "RestoreResult", "restore_files"]

_PROGRESS_EVERY = 512
"""Entries walked between two looks at the writers' progress counters."""


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
    processes: int = 0
    """Worker processes that create and write files (0: one per CPU, at most 4; 1: none,
    the restoring process writes them itself)."""
    threads: int = 1
    """Threads of each worker process (with one worker per core, more threads only hold
    more packs in memory: restore of the bench tree ~15 MiB more at the same speed). A
    restore without workers uses one thread per core, at least this many."""
    batch_bytes: int = 64 << 20
    batch_files: int = 1_000


@dataclass(slots=True)
class RestoreResult:
    """What was restored, and what could not be."""

    files: int = 0
    dirs: int = 0
    others: int = 0
    bytes_written: int = 0
    files_verified: int = 0
    issues: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Entries left out on purpose: sockets (a program makes them when it starts)."""


def _process_count(wanted: int) -> int:
    return wanted if wanted > 0 else min(4, os.cpu_count() or 1)


class _Restore:
    def __init__(
        self,
        repo: Repository,
        options: RestoreOptions,
        progress: Progress,
        cancel: Cancellation,
        writers: Writers,
    ) -> None:
        self.repo, self.options = repo, options
        self.progress, self.cancel, self.writers = progress, cancel, writers
        self.includes = ExcludeMatcher(options.includes)
        self.excludes = ExcludeMatcher(options.excludes)
        self.fs = FsRestorer(options.target, numeric_owner=options.numeric_owner)
        self.result = RestoreResult()
        self.state = ProgressState(phase="restore", started=now())
        self.batch: list[tuple[tuple[str, ...], Node]] = []
        self.batch_bytes = 0
        self.links: dict[tuple[int, int], tuple[str, ...]] = {}
        self.later_links: list[tuple[tuple[str, ...], tuple[str, ...], Node]] = []
        """Hard links to make at the end: path, source, node."""
        self.linked_dirs: set[tuple[str, ...]] = set()
        """Folders that get hard links at the end: their metadata waits until then."""
        self.created_dirs: set[tuple[str, ...]] = set()
        """Created folders on the walk's way (their entries are still being made)."""
        self.left_dirs: deque[tuple[int, tuple[str, ...]]] = deque()
        """Created folders the walk has left, and the batch that has their last files."""
        self.sent = 0
        """Batches handed to the writers (the one being gathered has this number)."""
        self.written: set[int] = set()
        self.written_below = 0
        """Every batch numbered below this is written."""
        self.walked = 0

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
            self.walked += 1
            if self.walked % _PROGRESS_EVERY == 0:
                self.show_progress()
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
                self.leave_dir(sub)
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

    def leave_dir(self, parts: tuple[str, ...]) -> None:
        """The walk is done with a folder: its metadata can be set once its files are
        written (see :meth:`finish_dirs`)."""
        if parts in self.created_dirs:
            self.created_dirs.discard(parts)
            self.left_dirs.append((self.sent, parts))

    def add_entry(self, parts: tuple[str, ...], node: Node) -> None:
        key = (node.dev, node.inode)
        if node.type != NodeType.DIR and node.nlink > 1 and key in self.links:
            self.later_links.append((parts, self.links[key], node))
            self.linked_dirs.add(parts[:-1])
            return
        if node.nlink > 1:
            self.links[key] = parts
        if node.type == NodeType.FILE:
            self.add_file(parts, node)
        elif self.fs.make_entry(parts, node):
            self.result.others += 1

    def add_file(self, parts: tuple[str, ...], node: Node) -> None:
        self.batch.append((parts, node))
        self.batch_bytes += node.size
        if (
            self.batch_bytes >= self.options.batch_bytes
            or len(self.batch) >= self.options.batch_files
        ):
            self.send_batch()

    # -- files, links, progress ----------------------------------------------
    def send_batch(self) -> None:
        """Hand the gathered files to the writers (which may wait for a free one)."""
        if self.batch:
            batch, self.batch, self.batch_bytes = self.batch, [], 0
            self.writers.submit(batch)
            self.sent += 1
        self.take(self.writers.poll())

    def take(self, done: BatchResult) -> None:
        """Count what the writers report; their link sources become linkable here."""
        self.result.files += done.files
        self.result.bytes_written += done.bytes_written
        self.result.files_verified += done.files_verified
        self.result.issues.extend(done.issues)
        for parts in done.linkable:
            self.fs.adopt(parts)
        self.written.update(done.batches)
        while self.written_below in self.written:
            self.written.discard(self.written_below)
            self.written_below += 1
        self.finish_dirs()

    def finish_dirs(self) -> None:
        """Set the metadata of the folders the walk left whose files are all written, so
        it is not all held until the end; folders that get hard links wait for them."""
        while self.left_dirs and self.left_dirs[0][0] < self.written_below:
            _batch, parts = self.left_dirs.popleft()
            if parts not in self.linked_dirs:
                self.fs.finish_dir(parts)

    def make_links(self) -> None:
        for parts, source, node in self.later_links:
            self.cancel.check()
            if self.fs.make_hardlink(parts, source):
                self.result.others += node.type != NodeType.FILE
                self.result.files += node.type == NodeType.FILE

    def show_progress(self) -> None:
        self.state.bytes_done, self.state.files_done = self.writers.progress()


def _matches_on_the_way(patterns: ExcludeMatcher, where: str, *, is_dir: bool) -> bool:
    """Whether ``where`` (the path restored; a folder if ``is_dir``) or a folder above it
    matches ``patterns``: what is below a matching path matches too."""
    if not patterns or where == "/":
        return False
    path = PurePosixPath(where)
    above = (str(p) for p in reversed(path.parents) if str(p) != "/")
    return any(patterns.excluded(p, is_dir=True) for p in above) or patterns.excluded(
        where, is_dir=is_dir
    )


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
    cancel = cancel or Cancellation()
    where, node = resolve_path(repo, snapshot, options.path)
    base = "" if where == "/" else where
    writer_options = WriterOptions(
        target=options.target,
        numeric_owner=options.numeric_owner,
        verify=options.verify,
        ignore_errors=options.ignore_errors,
        threads=options.threads,
        batch_files=options.batch_files,
    )
    # The writers first: worker processes are forked before this process starts threads.
    writers = start_writers(repo, writer_options, cancel, _process_count(options.processes))
    try:
        run = _Restore(repo, options, progress or NullProgress(), cancel, writers)
    except BaseException:
        writers.abort()
        raise
    if snapshot.summary.bytes_processed and where == "/" and not options.includes:
        run.state.bytes_total = snapshot.summary.bytes_processed
    is_dir = node is None or node.type == NodeType.DIR
    excluded = _matches_on_the_way(run.excludes, where, is_dir=is_dir)
    included = _matches_on_the_way(run.includes, where, is_dir=is_dir)
    try:
        with repo.lock(exclusive=False), Ticker(run.progress, run.state):
            if node is None or node.type == NodeType.DIR:
                tree = snapshot.tree if node is None else node.subtree
                if tree is not None and not excluded:
                    run.walk(tree, base, (), [], included)
            elif not excluded and (included or not run.includes):
                run.add_entry((node.name,), node)
            run.send_batch()
            run.take(writers.finish())
            run.make_links()
            run.show_progress()
    except BaseException:
        # Ctrl-C or a failure: the writers stop; what they finished stays.
        cancel.cancel()
        writers.abort()
        raise
    finally:
        issues = run.fs.close()
    run.result.issues[:0] = [(i.path, str(i.error)) for i in issues]
    run.result.skipped = [i.path for i in run.fs.skipped]
    run.progress.done(run.state)
    return run.result
