"""The walker run in a process of its own: the same entries, errors and order as
:func:`walk`, with the system calls (``lstat``, ``listxattr``, ``scandir``) and the
building of entries done beside the consumer instead of in its interpreter."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from stratavault._process import die_with_parent
from stratavault.errors import SourceError, UsageError
from stratavault.sources._entry import EntryType, FsEntry
from stratavault.sources._walk import ErrorHandler, walk

__all__ = ["walk_in_process"]

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
) -> Iterator[FsEntry]:
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


def _receive(child: BaseProcess, receiver: Connection, on_error: ErrorHandler) -> Iterator[FsEntry]:
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
