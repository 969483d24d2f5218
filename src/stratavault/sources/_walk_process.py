"""Walking in processes of their own: :func:`walk_in_process` gives the same entries,
errors and order as :func:`walk`, with the system calls (``lstat``, ``listxattr``,
``scandir``) and the building of entries done beside the consumer instead of in its
interpreter; :class:`TreeScan` reads a tree's inodes ahead of a walk and counts it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path, PurePosixPath
from typing import Any, cast

from stratavault._process import die_with_parent, shared_heap
from stratavault.errors import SourceError, UsageError
from stratavault.sources._entry import EntryType, FsEntry
from stratavault.sources._folder_states import FolderDone, FolderStates, KnownFolder, WalkRecord
from stratavault.sources._walk import ErrorHandler, TreeTotals, prefetch_metadata, walk

__all__ = ["StandbyWalker", "TreeScan", "walk_in_process", "walk_states_in_process"]

_BATCH = 512
"""Entries per message: big enough that pickling is cheap per entry, small enough that
the pipe (and so the memory held) stays small when the consumer is slower."""

_ENTRY, _ERROR, _USAGE, _DONE, _FOLDER, _KNOWN = range(6)
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
    options = (list(paths), list(excludes), list(exclude_files), one_file_system, None)
    return cast(Generator[FsEntry, None, None], _start(options, on_error))


def walk_states_in_process(
    paths: Sequence[Path],
    *,
    known: set[bytes],
    secret: bytes,
    excludes: Sequence[str] = (),
    exclude_files: Sequence[Path] = (),
    one_file_system: bool = False,
    on_error: ErrorHandler,
) -> Generator[WalkRecord, None, None]:
    """:func:`walk_in_process` with folder states (see :class:`FolderStates`): folders in a
    state of ``known`` come as one :class:`KnownFolder`, other folders' entries as from
    :func:`walk`, each folder followed by its :class:`FolderDone`. Errors are reported as
    they are met, possibly before entries that the walk yielded earlier."""
    options = (list(paths), list(excludes), list(exclude_files), one_file_system, (known, secret))
    return _start(options, on_error)


def _start(options: tuple[Any, ...], on_error: ErrorHandler) -> Generator[WalkRecord, None, None]:
    return StandbyWalker().start(options, on_error)


class StandbyWalker:
    """A walking child process started ahead of time: it imports while the backup opens
    the repository and finds its parent, then walks as :func:`walk_states_in_process`
    (:meth:`walk_states`) or is stopped unused (:meth:`stop`). ``OSError`` when no
    process can be started."""

    def __init__(self) -> None:
        with shared_heap() as context:
            self._conn, child_end = context.Pipe()
            self._child = context.Process(
                target=_standby_child, args=(child_end,), name="stratavault-walk", daemon=True
            )
            try:
                self._child.start()
            finally:
                child_end.close()
        self._used = False

    def walk_states(
        self,
        paths: Sequence[Path],
        *,
        known: set[bytes],
        secret: bytes,
        excludes: Sequence[str] = (),
        exclude_files: Sequence[Path] = (),
        one_file_system: bool = False,
        on_error: ErrorHandler,
    ) -> Generator[WalkRecord, None, None]:
        """What :func:`walk_states_in_process` yields, walked by this process (once)."""
        states = (known, secret)
        options = (list(paths), list(excludes), list(exclude_files), one_file_system, states)
        return self.start(options, on_error)

    def start(
        self, options: tuple[Any, ...], on_error: ErrorHandler
    ) -> Generator[WalkRecord, None, None]:
        """Send the walk's options; the records follow."""
        if self._used:
            raise RuntimeError("a standby walker walks once")
        self._used = True
        try:
            self._conn.send(options)
        except OSError as exc:
            raise SourceError("backup: the process walking the files ended early") from exc
        return _receive(self._child, self._conn, on_error)

    def stop(self) -> None:
        """End the process if it was not used (a walk's generator ends a used one)."""
        if not self._used:
            self._used = True
            self._child.kill()
            self._child.join()
            self._conn.close()


def _receive(
    child: BaseProcess, receiver: Connection, on_error: ErrorHandler
) -> Generator[WalkRecord, None, None]:
    try:
        yield from _records(receiver, on_error)
    finally:
        child.kill()
        child.join()
        receiver.close()


def _entry(value: tuple[Any, ...]) -> FsEntry:
    entry = FsEntry(*value)
    entry.type = _TYPES[entry.type]
    return entry


def _records(receiver: Connection, on_error: ErrorHandler) -> Iterator[WalkRecord]:
    while True:
        try:
            batch: list[_Record] = receiver.recv()
        except (EOFError, OSError) as exc:
            raise SourceError("backup: the process walking the files ended early") from exc
        for kind, value in batch:
            if kind == _ENTRY:
                yield _entry(value)
            elif kind == _FOLDER:
                yield FolderDone(*value)
            elif kind == _KNOWN:
                yield KnownFolder(_entry(value[0]), *value[1:])
            elif kind == _ERROR:
                path, errno, strerror = value
                on_error(Path(path), OSError(errno, strerror))
            elif kind == _USAGE:
                raise UsageError(value)
            else:
                return


def _standby_child(conn: Connection) -> None:
    """In the child: wait for the walk's options (``None``: not needed), then walk."""
    die_with_parent()
    try:
        options: tuple[Any, ...] | None = conn.recv()
    except (EOFError, OSError):
        return
    if options is not None:
        paths, excludes, exclude_files, one_file_system, states_of = options
        _walk_child(paths, excludes, exclude_files, one_file_system, states_of, conn)


def _walk_child(
    paths: list[Path],
    excludes: list[str],
    exclude_files: list[Path],
    one_file_system: bool,
    states_of: tuple[set[bytes], bytes] | None,
    sender: Connection,
) -> None:
    """In the child: walk and send the records in batches, then ``_DONE``."""
    die_with_parent()
    batch: list[_Record] = []
    states = FolderStates(*states_of) if states_of is not None else None

    def failed(path: Path, exc: OSError) -> None:
        batch.append((_ERROR, (str(path), exc.errno, exc.strerror or str(exc))))
        if states is not None:
            states.error()

    try:
        for e in walk(
            paths,
            excludes=excludes,
            exclude_files=exclude_files,
            one_file_system=one_file_system,
            on_error=failed,
        ):
            batch += map(_encode, states.feed(e) if states is not None else (e,))
            if len(batch) >= _BATCH:
                sender.send(batch)
                batch = []
        if states is not None:
            batch += map(_encode, states.finish())
    except UsageError as exc:
        batch.append((_USAGE, str(exc)))
    batch.append((_DONE, None))
    sender.send(batch)
    sender.close()


def _encode(record: WalkRecord) -> _Record:
    """A record as plain tuples (they pickle fast)."""
    if isinstance(record, FsEntry):
        return _ENTRY, _fields(record)
    if isinstance(record, FolderDone):
        return _FOLDER, (record.path, record.key)
    counts = (record.entries, record.folders, record.files, record.file_bytes)
    return _KNOWN, (_fields(record.entry), record.key, record.keys, *counts)


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
    and counts the files and bytes to back up for ``on_totals`` (progress; or later, see
    :meth:`report_totals`), beside the walk rather than competing with it for the
    interpreter."""

    def __init__(
        self,
        roots: Sequence[PurePosixPath],
        *,
        one_file_system: bool,
        excludes: list[str],
        on_totals: Callable[[TreeTotals], None] | None = None,
    ) -> None:
        with shared_heap() as context:
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
            self.report_totals(on_totals)

    def report_totals(self, on_totals: Callable[[TreeTotals], None]) -> None:
        """Call ``on_totals`` (from another thread) once the scan has counted the tree."""
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
