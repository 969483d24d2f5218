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
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import Any

from stratavault import __version__
from stratavault.errors import SourceError, UsageError
from stratavault.jobs._backup_run import BackupFilesOptions, FilesRun, OpenDir
from stratavault.jobs._backup_sources import (
    ReadAhead,
    absolute_roots,
    ancestors,
    entry_of,
    node_from_entry,
    start_read_ahead,
)
from stratavault.jobs._listing_cache import ListingCache
from stratavault.jobs._progress import Cancellation, NullProgress, Progress, Ticker, now
from stratavault.repo import Repository
from stratavault.snapshot import (
    Node,
    Snapshot,
    latest,
    load_snapshots,
    save_snapshot,
    save_tree,
    select_snapshots,
)
from stratavault.sources import FolderDone, KnownFolder, StandbyWalker, WalkRecord, walk

__all__ = ["backup_files"]


def _walk_roots(run: FilesRun, roots: list[PurePosixPath], dirs: dict[str, OpenDir]) -> None:
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


def _entries(run: FilesRun, roots: list[PurePosixPath]) -> Iterator[WalkRecord]:
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


def _buildancestors(run: FilesRun, roots: list[PurePosixPath]) -> dict[str, OpenDir]:
    dirs: dict[str, OpenDir] = {}
    for path in ancestors(roots) or [PurePosixPath("/")]:
        node = node_from_entry(entry_of(Path(path)))
        dirs[str(path)] = OpenDir(str(path), node)
        if path != path.parent:
            dirs[str(path.parent)].children.append(node)
    return dirs


def _finishancestors(run: FilesRun, dirs: dict[str, OpenDir]) -> Node:
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
        run = FilesRun(repo, options, parent, listings, progress, cancel)
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
    run: FilesRun,
    roots: list[PurePosixPath],
    paths: list[str],
    parent: Snapshot | None,
    started: dt.datetime,
    t0: float,
) -> Snapshot:
    """Walk, wait for the files, write the trees and the snapshot.

    On any failure or Ctrl-C the workers stop, and what was uploaded gets indexed,
    so the next backup reuses it (Ctrl-C does not wait for uploads in flight: see
    ``Repository.abandon``); no snapshot is written.
    """
    try:
        dirs = _buildancestors(run, roots)
        _walk_roots(run, roots, dirs)
        root = _finishancestors(run, dirs)
        run.shutdown(cancel=False)
        assert root.subtree is not None
        run.repo.flush()  # the last pack and the index are part of the time taken
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
    except BaseException as exc:
        run.cancel.cancel()
        run.shutdown(cancel=True)
        run.repo.settle(exc)
        raise
    return snapshot
