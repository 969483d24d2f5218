"""The state of one file backup: its options, the folders being built and the files in
flight (see :mod:`stratavault.jobs._backup_files` for how a backup runs)."""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratavault.errors import Interrupted, StorageError
from stratavault.jobs._backup_sources import node_from_entry
from stratavault.jobs._file_readers import Batch, FileReaders, FileResults
from stratavault.jobs._listing_cache import ListingCache
from stratavault.jobs._parent_trees import ParentListing, ParentTrees
from stratavault.jobs._progress import Cancellation, Progress, ProgressState, now
from stratavault.repo import Repository
from stratavault.snapshot import (
    ContentRun,
    FileError,
    Node,
    NodeType,
    Snapshot,
    SnapshotSummary,
    same_listing,
    save_tree,
)
from stratavault.sources import FileStamp, FsEntry, KnownFolder, StandbyWalker, same_file_stat
from stratavault.types import ChunkId

__all__ = ["BackupFilesOptions", "FilesRun", "OpenDir"]


@dataclass(frozen=True, slots=True)
class BackupFilesOptions:
    """What to back up and how."""

    paths: tuple[Path, ...]
    excludes: tuple[str, ...] = ()
    exclude_files: tuple[Path, ...] = ()
    one_file_system: bool = False
    tags: tuple[str, ...] = ()
    host: str = field(default_factory=socket.gethostname)
    parent: str | None = None
    """Snapshot id to compare against; ``None`` picks the latest of the same host and paths."""
    force_read: bool = False
    """Read every file even if it looks unchanged since the parent snapshot."""
    compression_level: int = 3
    workers: int = 0
    """Worker threads (0: one per core; more only add GIL contention)."""
    max_pending_batches: int = 0
    """Batches of files queued for the workers (0: two per worker); bounds memory."""
    processes_after_files: int | None = None
    """Small files go to worker processes once this many were sent to be read. ``None``: 0
    for a backup without parent snapshot (it reads every file, so its workers are forked
    before it has stored anything), else 2,000 (the bench's second backup, which reads
    the changed files in threads then, peaks ~9 MiB lower than with two worker processes)."""
    scan_totals: bool = False
    """Count files and bytes (in the read-ahead process) so progress can show an ETA."""
    max_closed_dirs: int = 1024
    """Finished folders waiting for their files before the walk pauses."""
    walk_process_after_entries: int = 10_000
    """Walk in a child process when the parent snapshot has at least this many entries."""


def _processes_after(options: BackupFilesOptions, parent: Snapshot | None) -> int:
    """Small files sent to threads before the worker processes start (see the option)."""
    if options.processes_after_files is not None:
        return options.processes_after_files
    return 2000 if parent is not None else 0


@dataclass(slots=True)
class OpenDir:
    """A directory being built: its node in the parent, its children, batches in flight."""

    path: str
    node: Node
    children: list[Node] = field(default_factory=list)
    pending: list[Future[FileResults]] = field(default_factory=list)
    above: OpenDir | None = None
    """The folder holding this one, if it was walked."""
    key: bytes | None = None
    """The folder's state (listing cache), when the walk gave one."""
    clean: bool = True
    """Nothing below the folder failed: its state may be remembered."""
    on_done: list[tuple[Future[FileResults], Callable[[Future[FileResults]], None]]] = field(
        default_factory=list
    )
    """What to do with each file's result, in the thread that writes the tree: a future
    counts as done before its done-callbacks have run, so they cannot fill the nodes."""

    def wait_on(
        self, future: Future[FileResults], then: Callable[[Future[FileResults]], None]
    ) -> None:
        """Do not write this directory's tree before ``future`` is done and ``then`` ran."""
        if not self.pending or self.pending[-1] is not future:
            self.pending.append(future)
        self.on_done.append((future, then))

    def take_finished(self) -> None:
        """Record the results of the files read so far, in walk order up to the first one
        still being read, and let go of what held them (a folder of thousands of files
        would otherwise keep every file's result until its last file is read)."""
        done = next((i for i, (f, _) in enumerate(self.on_done) if not f.done()), None)
        done = len(self.on_done) if done is None else done
        for f, then in self.on_done[:done]:
            then(f)
        del self.on_done[:done]
        read = next((i for i, f in enumerate(self.pending) if not f.done()), len(self.pending))
        del self.pending[:read]

    def take_results(self) -> None:
        """Wait for every file of this directory and record the results in its nodes."""
        for f in self.pending:
            f.exception()  # waits
        for f, then in self.on_done:
            then(f)
        self.on_done.clear()


class FilesRun:
    """State of one backup run."""

    BATCH_FILES = 64
    BATCH_BYTES = 4 << 20
    """A batch of small files is sent once it holds this many bytes (or ``BATCH_FILES``
    files). Up to two batches per worker wait or run, and a worker's sealed results come
    back whole: the bench's first backup peaked at a median of 181 MiB with 4 MiB, 201 MiB
    with 8 MiB (7 runs each, as fast). With packs filled in files, 2 MiB batches were not
    clearly lower (125 against 126-129 MiB over 13 interleaved runs) and were slower in
    median (6.68 against 6.32 s, 8.00 against 7.39 s); 1 MiB: 120 MiB, 7 % slower."""
    SMALL_FILE_BYTES = 4 << 20
    """Files up to this size go to worker processes in batches; larger ones stream in a thread."""

    def __init__(
        self,
        repo: Repository,
        options: BackupFilesOptions,
        parent: Snapshot | None,
        listings: ListingCache,
        progress: Progress,
        cancel: Cancellation,
    ) -> None:
        self.repo, self.options, self.progress, self.cancel = repo, options, progress, cancel
        self.parent_snapshot = parent
        self.parents = ParentTrees(repo, parent.tree if parent else None)
        self.listings = listings
        self.walker: StandbyWalker | None = None
        """The walking process started ahead of time, until the walk takes it."""
        self.keys: dict[str, bytes | None] = {}
        """Folder states given by the walk, until the folder's tree is written."""
        workers = options.workers or (os.cpu_count() or 1)
        self.readers = FileReaders(
            repo,
            level=options.compression_level,
            workers=workers,
            max_pending=options.max_pending_batches or 2 * workers,
            processes_after_files=_processes_after(options, parent),
            cancel=cancel,
            on_bytes=self._count_bytes,
        )
        self.lock = threading.Lock()
        self.closing: deque[OpenDir] = deque()
        self.stack: list[OpenDir] = []
        self.errors: list[FileError] = []
        self.summary = SnapshotSummary()
        self.state = ProgressState(phase="backup", started=now())
        self.batch = Batch()
        self.links: dict[tuple[int, int], tuple[Batch, int]] = {}

    def error(self, path: object, message: str) -> None:
        """Record a path that could not be backed up completely."""
        with self.lock:
            self.errors.append(FileError(str(path), message))
            self.state.errors += 1
        self.progress.warn(f"{path}: {message}")

    def set_totals(self, totals: tuple[int, int]) -> None:
        """The files and bytes the backup will look at, for progress."""
        self.state.files_total, self.state.bytes_total = totals

    def on_walk_error(self, path: Path, exc: OSError) -> None:
        """The walker could not read an entry."""
        self.error(path, f"cannot read: {exc.strerror or exc}")

    # -- files ---------------------------------------------------------------
    def add_file(self, entry: FsEntry, node: Node, container: OpenDir) -> None:
        """Reuse the parent's content for an unchanged file, else schedule a read."""
        listing = self.parents.listing(entry.parent)
        old = listing.by_name.get(entry.name)
        self.summary.bytes_processed += entry.size
        content = self._unchanged_content(old, listing, entry) if old is not None else None
        if content is not None:
            node.content = content
            self.summary.files_unmodified += 1
            with self.lock:
                self.state.files_done += 1
                self.state.bytes_done += entry.size
            return
        if old is None:
            self.summary.files_new += 1
        else:
            self.summary.files_changed += 1
        key = (entry.dev, entry.inode)
        found = self.links.get(key) if entry.nlink > 1 else None
        if found is None:
            large = entry.size > self.SMALL_FILE_BYTES
            batch = Batch(in_process=True) if large else self.batch
            position = len(batch.entries)
            batch.entries.append(entry)
            batch.size_bytes += entry.size
            if entry.nlink > 1:
                self.links[key] = (batch, position)
        else:
            batch, position = found
        container.wait_on(batch.future, lambda f: self._file_done(f, position, node, entry.path))
        if found is None and batch.in_process:
            self.readers.submit(batch)
        elif (
            len(self.batch.entries) >= self.BATCH_FILES or self.batch.size_bytes >= self.BATCH_BYTES
        ):
            self.submit_batch()

    def submit_batch(self) -> None:
        """Hand the small files collected so far to a worker process (and record what the
        folder being walked has got back)."""
        batch, self.batch = self.batch, Batch()
        if batch.entries:
            self.readers.submit(batch)
        if self.stack:
            self.stack[-1].take_finished()

    def shutdown(self, *, cancel: bool) -> None:
        """Stop the readers: wait for running tasks, drop queued ones when cancelling."""
        self.readers.shutdown(cancel=cancel)

    def _unchanged_content(
        self, old: dict[str, Any], listing: ParentListing, entry: FsEntry
    ) -> list[ContentRun] | None:
        """The parent's content runs if the file looks unchanged since then and its
        chunks are all stored, else None."""
        runs = listing.content.get(entry.name)
        if runs is None or self.options.force_read:
            return None
        stamp = FileStamp(
            old.get("size", -1),
            old.get("mtime_ns", -1),
            old.get("ctime_ns", -1),
            old.get("inode", -1),
        )
        return runs if same_file_stat(stamp, entry.stamp) else None

    def _count_bytes(self, n: int) -> None:
        with self.lock:
            self.state.bytes_done += n

    def _file_done(self, future: Future[FileResults], position: int, node: Node, path: str) -> None:
        if future.cancelled() or isinstance(future.exception(), Interrupted):
            return
        exc = future.exception()
        if isinstance(exc, StorageError):
            raise exc  # the repository failed (a full disk): the backup cannot go on
        result = exc if exc is not None else future.result()[position]
        if isinstance(result, BaseException):
            why = result.strerror if isinstance(result, OSError) and result.strerror else result
            node.error = f"cannot read: {why}"
            self.error(path, node.error)
            return
        node.content = result.content
        if result.changed:
            node.error = "file changed while it was read"
            self.error(path, node.error)
        with self.lock:
            self.summary.bytes_read += result.bytes_read
            self.summary.chunks_added += result.chunks_added
            self.summary.bytes_added_stored += result.bytes_stored
            self.state.files_done += 1

    # -- directories -------------------------------------------------------
    def add_entry(self, entry: FsEntry, container: OpenDir) -> None:
        """Attach a walked entry to its directory; open a new directory for a dir."""
        node = node_from_entry(entry)
        self.summary.entries += 1
        container.children.append(node)
        if entry.type == NodeType.DIR:
            self.stack.append(OpenDir(entry.path, node, above=container))
        elif entry.type == NodeType.FILE:
            self.add_file(entry, node, container)
        self.state.current = entry.path

    def close_until(self, parent: str | None) -> None:
        """Close walked directories that are not ``parent`` or an ancestor of it."""
        while self.stack and self.stack[-1].path != parent:
            self.closing.append(self.stack.pop())
        if len(self.closing) > self.options.max_closed_dirs:
            self.submit_batch()
            self.finish_closed(block=True)
        else:
            self.finish_closed(block=False)

    def add_known(self, known: KnownFolder, container: OpenDir) -> None:
        """A folder the listing cache knows, with everything below it: reuse its tree."""
        node = node_from_entry(known.entry)
        node.subtree = self.listings.reuse(known.key, known.keys)
        container.children.append(node)
        self.summary.entries += 1 + known.entries
        self.summary.dirs += 1 + known.folders
        self.summary.files_unmodified += known.files
        self.summary.bytes_processed += known.file_bytes
        with self.lock:
            self.state.files_done += known.files
            self.state.bytes_done += known.file_bytes
        self.state.current = known.entry.path

    def _tree_id(self, d: OpenDir) -> ChunkId:
        """Store the folder's listing, or reuse the parent's tree when it is the same; a
        folder with nothing failed below it is remembered in the listing cache."""
        old = self.parents.listing(d.path)
        if old.tree is not None and same_listing(d.children, old.docs):
            tree = old.tree  # read from the repository: stored
        else:
            tree = save_tree(self.repo, d.children)
        key = self.keys.pop(d.path, None)
        if key is not None and d.clean and not any(c.error for c in d.children):
            self.listings.record(key, tree)
        elif d.above is not None:
            d.above.clean = False
        return tree

    def finish_closed(self, *, block: bool) -> None:
        """Write the trees of closed directories whose files are all done, in order."""
        while self.closing:
            head = self.closing[0]
            if not block and not all(f.done() for f in head.pending):
                return
            head.take_results()
            self.cancel.check()
            self.closing.popleft()
            head.node.subtree = self._tree_id(head)
            self.parents.forget(head.path)
            self.summary.dirs += 1
