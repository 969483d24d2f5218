"""Walking in processes of their own: :func:`walk_in_process` gives the same entries,
errors and order as :func:`walk`, with the system calls (``lstat``, ``listxattr``,
``scandir``) and the building of entries done beside the consumer instead of in its
interpreter; :class:`TreeScan` reads a tree's inodes ahead of a walk and counts it."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path, PurePosixPath
from typing import Any, cast

from stratavault._process import die_with_parent
from stratavault.errors import SourceError, UsageError
from stratavault.sources._entry import EntryType, FsEntry
from stratavault.sources._walk import ErrorHandler, TreeTotals, prefetch_metadata, walk

__all__ = ["TreeScan", "walk_in_process"]

_BATCH = 512
"""Entries per message: big enough that pickling is cheap per entry, small enough that
the pipe (and so the memory held) stays small when the consumer is slower."""

_ENTRY, _ERROR, _USAGE, _DONE = range(4)
_TYPES = {str(t): t for t in EntryType}
_Record = tuple[int, Any]


def walk_in_process(
    paths: Sequence[Path],
    *,
    excludes: Sequence[str] = (),
    exclude_files: Sequence[Path] = (),
    one_file_system: bool = False,
    on_error: ErrorHandler,
) -> Generator[FsEntry, None, None]:
    """What :func:`walk` yields, walked by a child process that runs ahead of the
    consumer by a few hundred entries (the metadata is that of the moment the child
    read it). ``on_error`` is called in this process, in walk order. ``OSError`` at
    once when the process cannot be started; ``SourceError`` while iterating if it
    dies. The child ends when the iteration does (also when it is left early)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    options = (list(paths), list(excludes), list(exclude_files), one_file_system)
    child = context.Process(
        target=_walk_child, args=(*options, sender), name="stratavault-walk", daemon=True
    )
    try:
        child.start()
    finally:
        sender.close()
    return _receive(child, receiver, on_error)


def _receive(
    child: BaseProcess, receiver: Connection, on_error: ErrorHandler
) -> Generator[FsEntry, None, None]:
    try:
        yield from _records(receiver, on_error)
    finally:
        child.kill()
        child.join()
        receiver.close()


def _records(receiver: Connection, on_error: ErrorHandler) -> Iterator[FsEntry]:
    while True:
        try:
            batch: list[_Record] = receiver.recv()
        except (EOFError, OSError) as exc:
            raise SourceError("backup: the process walking the files ended early") from exc
        for kind, value in batch:
            if kind == _ENTRY:
                entry = FsEntry(*value)
                entry.type = _TYPES[entry.type]
                yield entry
            elif kind == _ERROR:
                path, errno, strerror = value
                on_error(Path(path), OSError(errno, strerror))
            elif kind == _USAGE:
                raise UsageError(value)
            else:
                return


def _walk_child(
    paths: list[Path],
    excludes: list[str],
    exclude_files: list[Path],
    one_file_system: bool,
    sender: Connection,
) -> None:
    """In the child: walk and send the records in batches, then ``_DONE``."""
    die_with_parent()
    batch: list[_Record] = []

    def failed(path: Path, exc: OSError) -> None:
        batch.append((_ERROR, (str(path), exc.errno, exc.strerror or str(exc))))

    try:
        for e in walk(
            paths,
            excludes=excludes,
            exclude_files=exclude_files,
            one_file_system=one_file_system,
            on_error=failed,
        ):
            batch.append((_ENTRY, _fields(e)))
            if len(batch) >= _BATCH:
                sender.send(batch)
                batch = []
    except UsageError as exc:
        batch.append((_USAGE, str(exc)))
    batch.append((_DONE, None))
    sender.send(batch)
    sender.close()


def _fields(e: FsEntry) -> tuple[Any, ...]:
    """The entry's fields in :class:`FsEntry` order (a plain tuple pickles fast)."""
    return (
        e.path, e.parent, e.name, e.depth, str(e.type), e.mode, e.uid, e.gid, e.user,
        e.group, e.size, e.mtime_ns, e.atime_ns, e.ctime_ns, e.inode, e.dev, e.nlink,
        e.rdev, e.link_target, dict(e.xattrs),
    )  # fmt: skip


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
        roots: Sequence[PurePosixPath],
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
