"""What a file backup reads from the file system besides file content: the paths to back
up, the folders above them, entries turned into tree nodes, and inode read-ahead."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path, PurePosixPath
from typing import cast

from stratavault._process import die_with_parent
from stratavault.errors import SourceError
from stratavault.snapshot import Node
from stratavault.sources import FsEntry, TreeTotals, prefetch_metadata, walk

__all__ = [
    "TreeScan",
    "absolute_roots",
    "ancestors",
    "entry_of",
    "node_from_entry",
]


def node_from_entry(entry: FsEntry) -> Node:
    """A tree node with the metadata of a walked entry (content comes later)."""
    return Node(
        name=entry.name,
        type=str(entry.type),
        mode=entry.mode,
        uid=entry.uid,
        gid=entry.gid,
        user=entry.user,
        group=entry.group,
        size=entry.size if entry.type == "file" else 0,
        mtime_ns=entry.mtime_ns,
        atime_ns=entry.atime_ns,
        ctime_ns=entry.ctime_ns,
        inode=entry.inode,
        dev=entry.dev,
        nlink=entry.nlink,
        rdev=entry.rdev,
        link_target=entry.link_target,
        xattrs=dict(entry.xattrs),
    )


def ancestors(paths: list[PurePosixPath]) -> list[PurePosixPath]:
    """Every folder above the given paths, the root first."""
    found = {a for p in paths for a in p.parents}
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def entry_of(path: Path) -> FsEntry:
    """The metadata of one folder above a backed-up path (its contents are not read)."""

    def fail(where: Path, exc: OSError) -> None:
        raise SourceError(f"backup: cannot read folder {where}: {exc.strerror or exc}")

    entries = walk([path], on_error=fail)
    try:
        return next(iter(entries))
    finally:
        entries.close()  # type: ignore[attr-defined]


def absolute_roots(paths: tuple[Path, ...]) -> list[PurePosixPath]:
    roots = []
    for p in paths:
        absolute = PurePosixPath(os.path.normpath(os.path.abspath(p)))
        if not os.path.lexists(absolute):
            raise SourceError(f"backup: path {p} does not exist")
        roots.append(absolute)
    roots = sorted(set(roots))
    # A path inside another given path is already covered.
    return [r for r in roots if not any(o != r and o in r.parents for o in roots)]


def _prefetch_child(
    roots: list[str], one_file_system: bool, excludes: list[str], totals: Connection
) -> None:
    """The read-ahead process: ends with the backup, however that ends."""
    die_with_parent()
    totals.send(prefetch_metadata(roots, one_file_system, excludes))


class TreeScan:
    """A process that reads the tree's inodes ahead of the backup's walk (cold caches)
    and counts the files and bytes to back up for ``on_totals`` (progress), beside the
    walk rather than competing with it for the interpreter."""

    def __init__(
        self,
        roots: list[PurePosixPath],
        *,
        one_file_system: bool,
        excludes: list[str],
        on_totals: Callable[[TreeTotals], None] | None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._totals, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_prefetch_child,
            args=([str(r) for r in roots], one_file_system, excludes, child_end),
            name="stratavault-prefetch",
            daemon=True,
        )
        self._process.start()  # OSError when no process can be started
        child_end.close()
        self._waiter: threading.Thread | None = None
        if on_totals is not None:
            self._waiter = threading.Thread(
                target=self._wait_totals, args=(on_totals,), name="totals", daemon=True
            )
            self._waiter.start()

    def _wait_totals(self, on_totals: Callable[[TreeTotals], None]) -> None:
        try:
            totals = self._totals.recv()  # waits without holding the interpreter
        except (EOFError, OSError):
            return  # stopped before it was done
        on_totals(cast(TreeTotals, totals))

    def finish(self) -> None:
        """Wait for the totals (the scan walks what the backup walked: it is about done)."""
        if self._waiter is not None:
            self._waiter.join()

    def stop(self) -> None:
        """End the process, done or not."""
        self._process.kill()
        self._process.join()
        self._totals.close()
        if self._waiter is not None:
            self._waiter.join()
