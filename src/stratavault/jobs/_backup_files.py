"""Use case: back up directory trees into a snapshot (the paper's in-guest mechanism).

The walk runs in the calling thread and builds directory trees bottom-up; file
content is read, chunked, hashed, compressed and encrypted by a pool of worker
threads (the native libraries release the GIL). A directory's tree is written once
its files are done; directories finish in post-order, so a parent always sees its
children's tree ids. Memory stays bounded: at most ``max_pending_files`` files are
in flight, and each worker holds a few read buffers.

The snapshot holds the absolute paths: its root tree is ``/``, with the folders
leading to each backed-up path (their metadata taken from the real folders).
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from stratavault import __version__
from stratavault.errors import Interrupted, SourceError, UsageError
from stratavault.jobs._backup_sources import (
    ReadAhead,
    absolute_roots,
    ancestors,
    entry_of,
    node_from_entry,
    start_read_ahead,
)
from stratavault.jobs._file_readers import Batch, FileReaders, FileResults
from stratavault.jobs._listing_cache import ListingCache
from stratavault.jobs._parent_trees import ParentListing, ParentTrees
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
    ContentRun,
    FileError,
    Node,
    NodeType,
    Snapshot,
    SnapshotSummary,
    latest,
    load_snapshots,
    save_snapshot,
    save_tree,
    save_tree_docs,
    select_snapshots,
    tree_docs,
)
from stratavault.sources import (
    FileStamp,
    FolderDone,
    FsEntry,
    KnownFolder,
    StandbyWalker,
    WalkRecord,
    same_file_stat,
    walk,
)
from stratavault.types import ChunkId

__all__ = ["BackupFilesOptions", "backup_files"]


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
    processes_after_files: int = 2000
    """Small files go to worker processes once this many were sent to be read (starting the
    processes costs ~0.3 s, worth it only for backups that read many files)."""
    scan_totals: bool = False
    """Count files and bytes (in the read-ahead process) so progress can show an ETA."""
    max_closed_dirs: int = 1024
    """Finished folders waiting for their files before the walk pauses."""
    walk_process_after_entries: int = 10_000
    """Walk in a child process when the parent snapshot has at least this many entries."""


@dataclass(slots=True)
class _Dir:
    """A directory being built: its node in the parent, its children, batches in flight."""

    path: str
    node: Node
    children: list[Node] = field(default_factory=list)
    pending: list[Future[FileResults]] = field(default_factory=list)
    above: _Dir | None = None
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

    def take_results(self) -> None:
        """Wait for every file of this directory and record the results in its nodes."""
        for f in self.pending:
            f.exception()  # waits
        for f, then in self.on_done:
            then(f)
        self.on_done.clear()


class _Run:
    """State of one backup run."""

    BATCH_FILES = 64
    BATCH_BYTES = 8 << 20
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
            processes_after_files=options.processes_after_files,
            cancel=cancel,
            on_bytes=self._count_bytes,
        )
        self.lock = threading.Lock()
        self.closing: deque[_Dir] = deque()
        self.stack: list[_Dir] = []
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
    def add_file(self, entry: FsEntry, node: Node, container: _Dir) -> None:
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
        """Hand the small files collected so far to a worker process."""
        batch, self.batch = self.batch, Batch()
        if batch.entries:
            self.readers.submit(batch)

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
    def add_entry(self, entry: FsEntry, container: _Dir) -> None:
        """Attach a walked entry to its directory; open a new directory for a dir."""
        node = node_from_entry(entry)
        self.summary.entries += 1
        container.children.append(node)
        if entry.type == NodeType.DIR:
            self.stack.append(_Dir(entry.path, node, above=container))
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

    def add_known(self, known: KnownFolder, container: _Dir) -> None:
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

    def _tree_id(self, d: _Dir) -> ChunkId:
        """Store the folder's listing, or reuse the parent's tree when it is the same; a
        folder with nothing failed below it is remembered in the listing cache."""
        docs = tree_docs(d.children)
        old = self.parents.listing(d.path)
        if old.tree is not None and docs == old.docs:
            tree = old.tree  # read from the repository: stored
        else:
            tree = save_tree_docs(self.repo, docs)
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


def _walk_roots(run: _Run, roots: list[PurePosixPath], dirs: dict[str, _Dir]) -> None:
    for record in _entries(run, roots):
        run.cancel.check()
        if isinstance(record, FolderDone):
            run.keys[record.path] = record.key
            continue
        entry = record.entry if isinstance(record, KnownFolder) else record
        parent = entry.parent
        if entry.depth == 0 and entry.path == "/":
            run.close_until(None)
            run.stack.append(dirs["/"])  # backing up "/": its entries go in the root
            continue
        if entry.depth == 0:  # the next root
            run.close_until(None)
            container = dirs[parent]
        else:
            run.close_until(parent)
            container = run.stack[-1]
        if isinstance(record, KnownFolder):
            run.add_known(record, container)
        else:
            run.add_entry(entry, container)
    run.close_until(None)
    run.submit_batch()
    run.finish_closed(block=True)


def _entries(run: _Run, roots: list[PurePosixPath]) -> Iterator[WalkRecord]:
    """The walk of every root: in a child process when the parent snapshot says the tree
    is large (the system calls then run beside the comparison with the parent; folders
    the listing cache knows come as one record each), the standby walker if the command
    started one; else here (starting a process costs ~0.1 s, and a small tree is quickly
    compared with its parent)."""
    opts = run.options
    paths = [Path(r) for r in roots]
    options: dict[str, Any] = {
        "excludes": opts.excludes,
        "exclude_files": opts.exclude_files,
        "one_file_system": opts.one_file_system,
    }
    walker, run.walker = run.walker, None
    if walker is not None and not walker.walks(paths, **options):
        walker.stop()  # started for another walk
        walker = None
    parent = run.parent_snapshot
    if parent is not None and parent.summary.entries >= opts.walk_process_after_entries:
        known = set() if opts.force_read else run.listings.known()
        with suppress(OSError, SourceError):
            walker = walker or StandbyWalker(paths, **options)
            secret = run.listings.secret
            return walker.walk_states(known=known, secret=secret, on_error=run.on_walk_error)
    if walker is not None:
        walker.stop()  # walked here: no parent, or a small tree
    return walk(paths, on_error=run.on_walk_error, **options)


def _buildancestors(run: _Run, roots: list[PurePosixPath]) -> dict[str, _Dir]:
    dirs: dict[str, _Dir] = {}
    for path in ancestors(roots) or [PurePosixPath("/")]:
        node = node_from_entry(entry_of(Path(path)))
        dirs[str(path)] = _Dir(str(path), node)
        if path != path.parent:
            dirs[str(path.parent)].children.append(node)
    return dirs


def _finishancestors(run: _Run, dirs: dict[str, _Dir]) -> Node:
    for path in sorted(dirs, key=lambda p: -p.count("/") - (p != "/")):
        d = dirs[path]
        d.take_results()
        d.node.subtree = save_tree(run.repo, d.children)
    return dirs["/"].node


def _pick_parent(
    repo: Repository, options: BackupFilesOptions, paths: list[str]
) -> Snapshot | None:
    snaps = [s for s in load_snapshots(repo, damaged=[]) if s.tree is not None]
    if options.parent:  # (damaged snapshots and disk snapshots are no parents)
        sid = repo.resolve_snapshot_id(options.parent)
        found = [s for s in snaps if s.id == sid]
        if not found:
            raise UsageError(f"parent snapshot {options.parent}: not a readable file snapshot")
        return found[0]
    same = select_snapshots(snaps, hosts=[options.host], paths=paths)
    return latest(same) if same else None


def backup_files(
    repo: Repository,
    options: BackupFilesOptions,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    read_ahead: ReadAhead | None = None,
) -> Snapshot:
    """Back up ``options.paths`` and save a snapshot; return it.

    Unreadable files are listed in ``snapshot.errors`` (the snapshot is incomplete).
    On cancellation the data written so far is indexed, so the next backup reuses it,
    and ``Interrupted`` is raised; no snapshot is written. ``read_ahead``: the processes
    :func:`start_read_ahead` started for these paths (stopped here); without them, a
    read-ahead is started for an incremental backup or when progress shows totals.
    """
    progress = progress or NullProgress()
    cancel = cancel or Cancellation()
    roots = absolute_roots(options.paths)
    started, t0 = clock(), now()
    with repo.lock(exclusive=False):
        repo.recover_unindexed_packs()
        paths = [str(r) for r in roots]
        parent = _pick_parent(repo, options, paths)
        listings = ListingCache.load(repo, options.host, paths, parent.id if parent else None)
        run = _Run(repo, options, parent, listings, progress, cancel)
        if read_ahead is None and (parent is not None or options.scan_totals):
            read_ahead = _read_ahead(options)
        scan = read_ahead.scan if read_ahead is not None else None
        run.walker = read_ahead.walker if read_ahead is not None else None
        if scan is not None and options.scan_totals:
            scan.report_totals(run.set_totals)
        try:
            with Ticker(progress, run.state):
                snapshot = _run_and_save(run, roots, paths, parent, started, t0)
                if scan is not None:
                    scan.finish()
        finally:
            if read_ahead is not None:
                read_ahead.stop()
    progress.done(run.state)
    return snapshot


def _read_ahead(options: BackupFilesOptions) -> ReadAhead:
    """The read-ahead process for a backup (an incremental one mostly walks); no standby
    walker: the walk is about to start."""
    return start_read_ahead(
        options.paths,
        excludes=options.excludes,
        exclude_files=options.exclude_files,
        one_file_system=options.one_file_system,
        walker=False,
    )


def _run_and_save(
    run: _Run,
    roots: list[PurePosixPath],
    paths: list[str],
    parent: Snapshot | None,
    started: dt.datetime,
    t0: float,
) -> Snapshot:
    """Walk, wait for the files, write the trees and the snapshot.

    On any failure or Ctrl-C the workers stop, and what was uploaded gets indexed,
    so the next backup reuses it; no snapshot is written.
    """
    try:
        dirs = _buildancestors(run, roots)
        _walk_roots(run, roots, dirs)
        root = _finishancestors(run, dirs)
        run.shutdown(cancel=False)
        assert root.subtree is not None
        run.summary.duration_s = round(now() - t0, 3)
        snapshot = Snapshot(
            time=started,
            host=run.options.host,
            user=getpass.getuser(),
            paths=paths,
            tree=root.subtree,
            tags=list(run.options.tags),
            parent=parent.id if parent else None,
            errors=run.errors,
            summary=run.summary,
            program_version=__version__,
        )
        run.cancel.check()
        run.repo.flush()
        run.cancel.check()
        save_snapshot(run.repo, snapshot)
        run.listings.save(snapshot.id)
    except BaseException:
        run.cancel.cancel()
        run.shutdown(cancel=True)
        run.repo.flush()
        raise
    return snapshot
