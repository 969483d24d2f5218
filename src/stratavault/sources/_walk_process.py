"""Walking in processes of their own: :func:`walk_in_process` gives the same entries,
errors and order as :func:`walk`, with the system calls (``lstat``, ``listxattr``,
``scandir``) and the building of entries done beside the consumer instead of in its
interpreter; :class:`TreeScan` reads a tree's inodes ahead of a walk and counts it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path, PurePosixPath
from typing import Any, cast

from stratavault._process import die_with_parent, shared_heap
from stratavault.errors import SourceError, UsageError
from stratavault.sources._entry import FsEntry, entry_fields, entry_from_fields
from stratavault.sources._folder_states import FolderDone, FolderStates, KnownFolder, WalkRecord
from stratavault.sources._walk import (
    UNREAD_XATTRS,
    ErrorHandler,
    TreeTotals,
    prefetch_metadata,
    read_xattrs,
    walk,
)

__all__ = ["StandbyWalker", "TreeScan", "walk_in_process", "walk_states_in_process"]

_BATCH = 512
"""Entries per message: big enough that pickling is cheap per entry, small enough that
the pipe (and so the memory held) stays small when the consumer is slower."""

_ENTRY, _ERROR, _USAGE, _DONE, _FOLDER, _KNOWN = range(6)
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
    walker = StandbyWalker(
        paths, excludes=excludes, exclude_files=exclude_files, one_file_system=one_file_system
    )
    return cast(Generator[FsEntry, None, None], walker.start(None, on_error))


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
    walker = StandbyWalker(
        paths, excludes=excludes, exclude_files=exclude_files, one_file_system=one_file_system
    )
    return walker.walk_states(known=known, secret=secret, on_error=on_error)


class StandbyWalker:
    """A child process that walks ``paths`` (as :func:`walk` with these options), started
    before the walk's consumer is ready.

    It starts walking at once and keeps up to ``ahead`` entries, and the errors met,
    while the backup imports, opens the repository and finds its parent; then
    :meth:`walk_states` tells it the folder states to look for and it goes on as
    :func:`walk_states_in_process`. Or :meth:`stop` ends it unused. ``OSError`` when no
    process can be started.

    ``ahead`` is small: the entries kept are Python objects the walker's heap holds on to
    after sending them (an unchanged backup of the bench tree peaked at 75-83 MiB with
    10,000 kept, 71-73 MiB in most runs with 1,000, at the same speed: the read-ahead
    process has warmed the inodes either way)."""

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        excludes: Sequence[str] = (),
        exclude_files: Sequence[Path] = (),
        one_file_system: bool = False,
        ahead: int = 1_000,
    ) -> None:
        self._options = _walk_options(paths, excludes, exclude_files, one_file_system)
        with shared_heap() as context:
            self._conn, child_end = context.Pipe()
            self._child = context.Process(
                target=_standby_child,
                args=(child_end, self._options, ahead),
                name="stratavault-walk",
                daemon=True,
            )
            try:
                self._child.start()
            finally:
                child_end.close()
        self._used = False

    def walks(
        self,
        paths: Sequence[Path],
        *,
        excludes: Sequence[str] = (),
        exclude_files: Sequence[Path] = (),
        one_file_system: bool = False,
    ) -> bool:
        """Whether it walks ``paths`` with these options (it was started for them)."""
        return self._options == _walk_options(paths, excludes, exclude_files, one_file_system)

    def walk_states(
        self, *, known: set[bytes], secret: bytes, on_error: ErrorHandler
    ) -> Generator[WalkRecord, None, None]:
        """What :func:`walk_states_in_process` yields, walked by this process (once)."""
        return self.start((known, secret), on_error)

    def start(
        self, states_of: tuple[set[bytes], bytes] | None, on_error: ErrorHandler
    ) -> Generator[WalkRecord, None, None]:
        """Tell the child to go on (with folder states, or plain entries); the records follow."""
        if self._used:
            raise RuntimeError("a standby walker walks once")
        self._used = True
        try:
            self._conn.send((states_of,))
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


def _records(receiver: Connection, on_error: ErrorHandler) -> Iterator[WalkRecord]:
    while True:
        try:
            batch: list[_Record] = receiver.recv()
        except (EOFError, OSError) as exc:
            raise SourceError("backup: the process walking the files ended early") from exc
        for kind, value in batch:
            if kind == _ENTRY:
                yield entry_from_fields(value)
            elif kind == _FOLDER:
                yield FolderDone(*value)
            elif kind == _KNOWN:
                yield KnownFolder(entry_from_fields(value[0]), *value[1:])
            elif kind == _ERROR:
                path, errno, strerror = value
                on_error(Path(path), OSError(errno, strerror))
            elif kind == _USAGE:
                raise UsageError(value)
            else:
                return


def _walk_options(
    paths: Sequence[Path],
    excludes: Sequence[str],
    exclude_files: Sequence[Path],
    one_file_system: bool,
) -> tuple[list[Path], list[str], list[Path], bool]:
    """The options of a walk as the child takes them (and as :meth:`StandbyWalker.walks`
    compares them)."""
    return list(paths), list(excludes), list(exclude_files), one_file_system


_Met = tuple[Path, OSError]
"""A walk error met before the consumer was ready: replayed in its place."""


def _standby_child(conn: Connection, walk_options: tuple[Any, ...], ahead: int) -> None:
    """In the child: walk up to ``ahead`` entries until told to go on (``(states,)``) or
    to stop (``None``), then send the records in batches, then ``_DONE``."""
    die_with_parent()
    walked = _WalkAhead(walk_options)
    walked.run_ahead(conn, ahead)
    try:
        message: tuple[tuple[set[bytes], bytes] | None] | None = conn.recv()
    except (EOFError, OSError):
        return
    if message is not None:
        _send_records(conn, walked, message[0])


class _WalkAhead:
    """The child's walk (extended attributes left unread, see :func:`_with_xattrs`): what
    it meets before anyone listens is kept, entries and errors in their order, and given
    again in place by :meth:`entries`."""

    def __init__(self, walk_options: tuple[Any, ...]) -> None:
        paths, excludes, exclude_files, one_file_system = walk_options
        self.early: list[FsEntry | _Met] = []
        self.usage: UsageError | None = None
        self.on_error: ErrorHandler = lambda path, exc: self.early.append((path, exc))
        self.walked = walk(
            paths,
            excludes=excludes,
            exclude_files=exclude_files,
            one_file_system=one_file_system,
            on_error=lambda path, exc: self.on_error(path, exc),
            xattrs=False,
        )

    def run_ahead(self, conn: Connection, ahead: int) -> None:
        """Walk until ``ahead`` entries are kept or a message waits on ``conn``."""
        try:
            while len(self.early) < ahead and not conn.poll():
                entry = next(self.walked, None)
                if entry is None:
                    return
                self.early.append(entry)
        except UsageError as exc:
            self.usage = exc

    def entries(self, on_error: ErrorHandler) -> Iterator[FsEntry]:
        """The kept entries (their errors to ``on_error`` in place), then the rest."""
        self.on_error = on_error
        for item in self.early:
            if isinstance(item, FsEntry):
                yield item
            else:
                on_error(*item)
        self.early.clear()
        if self.usage is not None:
            raise self.usage
        yield from self.walked


def _send_records(
    conn: Connection, walked: _WalkAhead, states_of: tuple[set[bytes], bytes] | None
) -> None:
    """Send the walk's records (with folder states if ``states_of``) in batches."""
    batch: list[_Record] = []
    states = FolderStates(*states_of) if states_of is not None else None
    failures = [0]

    def failed(path: Path, exc: OSError) -> None:
        batch.append((_ERROR, (str(path), exc.errno, exc.strerror or str(exc))))
        failures[0] += 1
        if states is not None:
            states.error()

    def send(records: Iterable[WalkRecord]) -> None:
        """Encode ``records`` into batches of ``_BATCH`` (a folder of thousands of entries
        released at once goes in several messages, not one that both sides hold whole)."""
        for record in _with_xattrs(records, failed, failures):
            batch.append(_encode(record))
            if len(batch) >= _BATCH:
                conn.send(batch)
                batch.clear()

    try:
        for e in walked.entries(failed):
            send(states.feed(e) if states is not None else (e,))
        if states is not None:
            send(states.finish())
    except UsageError as exc:
        batch.append((_USAGE, str(exc)))
    batch.append((_DONE, None))
    conn.send(batch)
    conn.close()


def _with_xattrs(
    records: Iterable[WalkRecord], failed: ErrorHandler, failures: list[int]
) -> Iterator[WalkRecord]:
    """``records`` with the extended attributes of their entries read now (the walk passed
    over them: folders in a known state need none). When one cannot be read (reported
    through ``failed``, which counts in ``failures``), the folders closed after it in
    these records lose their state keys, as a walk error would have made them."""
    seen = failures[0]
    for record in records:
        if isinstance(record, FolderDone):
            yield record if failures[0] == seen else FolderDone(record.path, None)
            continue
        entry = record.entry if isinstance(record, KnownFolder) else record
        if entry.xattrs is UNREAD_XATTRS:
            entry.xattrs = read_xattrs(entry.path, failed)
        yield record


def _encode(record: WalkRecord) -> _Record:
    """A record as plain tuples (they pickle fast)."""
    if isinstance(record, FsEntry):
        return _ENTRY, entry_fields(record)
    if isinstance(record, FolderDone):
        return _FOLDER, (record.path, record.key)
    counts = (record.entries, record.folders, record.files, record.file_bytes)
    return _KNOWN, (entry_fields(record.entry), record.key, record.keys, *counts)


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
