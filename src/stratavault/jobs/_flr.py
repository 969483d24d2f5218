"""Use case: file-level restore (FLR) out of disk snapshots, with no mount and no full restore.

A disk of an "image" or "vm" snapshot is read through a :class:`DiskReader` (chunks out of
the repository on demand); ``sources`` finds its partitions and logical volumes and reads
the filesystem on one of them. From there: list a path, restore it into a folder (through
:class:`FsRestorer`: nothing is ever written outside the target), or write it as a tar
stream. Everything streams: one folder's listing per level of depth is in memory, file
content goes through in blocks of a few MiB.

References: ``SNAPSHOT:DISK[:VOLUME][/PATH]`` where VOLUME is ``p1``, ``1``, ``p0`` (a disk
without a partition table) or an LVM ``VG-LV`` name; without VOLUME, the disk's only
volume with a readable filesystem.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from stratavault.errors import SourceError, UsageError
from stratavault.jobs._disk_reader import DiskReader, open_disk_reader
from stratavault.jobs._progress import (
    Cancellation,
    NullProgress,
    Progress,
    ProgressState,
    Ticker,
    now,
)
from stratavault.repo import Repository
from stratavault.snapshot import Snapshot
from stratavault.sources import (
    FILESYSTEMS,
    FlrEntry,
    FlrFilesystem,
    FlrVolume,
    FsRestorer,
    flr_lookup,
    flr_read,
    flr_walk,
    list_volumes,
    open_filesystem,
)
from stratavault.types import EntryType

__all__ = [
    "FlrIssue",
    "FlrRef",
    "FlrRestoreOptions",
    "FlrResult",
    "FlrSession",
    "flr_dump",
    "flr_list",
    "flr_restore",
    "list_disk_volumes",
    "parse_flr_ref",
]


@dataclass(frozen=True, slots=True)
class FlrRef:
    """What ``SNAPSHOT:DISK[:VOLUME][/PATH]`` names."""

    snapshot: str
    disk: str
    volume: str | None = None
    path: str = "/"


def parse_flr_ref(word: str) -> FlrRef:
    """Parse ``SNAPSHOT:DISK[:VOLUME][/PATH]``; ``UsageError`` when there is no disk."""
    snapshot, _, rest = word.partition(":")
    head, slash, path = rest.partition("/")
    disk, _, volume = head.partition(":")
    if not snapshot or not disk:
        raise UsageError(f"{word!r}: expected SNAPSHOT:DISK[:PARTITION][/PATH]")
    return FlrRef(snapshot, disk, volume or None, "/" + path if slash else "/")


@dataclass(frozen=True, slots=True)
class FlrIssue:
    """An entry left out or restored in part: its path in the filesystem and why."""

    path: str
    error: str


@dataclass(slots=True)
class FlrResult:
    """What a restore or dump did."""

    files: int = 0
    dirs: int = 0
    others: int = 0
    bytes_written: int = 0
    issues: list[FlrIssue] = field(default_factory=list)


class FlrSession:
    """One disk of a snapshot opened for FLR: its volumes, and filesystems on demand.

    Use as a context manager; it owns the :class:`DiskReader`.
    """

    def __init__(self, repo: Repository, snapshot: Snapshot, disk: str) -> None:
        self.reader: DiskReader = open_disk_reader(repo, snapshot, disk)
        self.where = f"snapshot {snapshot.short_id} disk {self.reader.name}"
        try:
            self.volumes = list_volumes(self.reader, self.reader.size, where=self.where)
        except BaseException:
            self.reader.close()
            raise

    def __enter__(self) -> FlrSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reader.close()

    def volume(self, name: str | None) -> FlrVolume:
        """The volume called ``name`` (``p2``, ``2``, ``VG-LV``); the only readable one if None."""
        names = ", ".join(f"{v.name} ({v.filesystem or 'unknown'})" for v in self.volumes)
        if name is None:
            readable = [v for v in self.volumes if v.filesystem in FILESYSTEMS]
            if len(readable) == 1:
                return readable[0]
            raise UsageError(
                f"{self.where} has {len(readable)} readable filesystems: name one as "
                f"SNAPSHOT:DISK:PARTITION/PATH (volumes: {names})"
            )
        wanted = f"p{name}" if name.isdigit() else name
        for volume in self.volumes:
            if volume.name == wanted:
                return volume
        raise UsageError(f"{self.where}: no partition {name!r} (it has {names or 'none'})")

    def filesystem(self, volume: FlrVolume) -> FlrFilesystem:
        """The filesystem on ``volume``; ``SourceError`` when unknown or corrupt."""
        return open_filesystem(
            volume.open(), volume.filesystem, where=f"{self.where} partition {volume.name}"
        )


def list_disk_volumes(repo: Repository, snapshot: Snapshot, disk: str) -> list[FlrVolume]:
    """The partitions and logical volumes of one disk of a snapshot."""
    with FlrSession(repo, snapshot, disk) as session:
        return list(session.volumes)


@contextlib.contextmanager
def _open_path(
    repo: Repository, snapshot: Snapshot, ref: FlrRef
) -> Iterator[tuple[FlrFilesystem, list[str], FlrEntry, str]]:
    with FlrSession(repo, snapshot, ref.disk) as session:
        volume = session.volume(ref.volume)
        fs = session.filesystem(volume)
        where = f"{session.where} partition {volume.name}"
        parts, entry = flr_lookup(fs, ref.path, where=where)
        yield fs, parts, entry, where


def flr_list(
    repo: Repository,
    snapshot: Snapshot,
    ref: FlrRef,
    *,
    recursive: bool = False,
    issues: list[FlrIssue] | None = None,
) -> Iterator[tuple[str, FlrEntry]]:
    """``(path, entry)`` of the entry at ``ref.path`` (if not a folder) or of the entries
    below it (one level, or all with ``recursive``), streamed. Entries left out are added
    to ``issues`` (path and reason)."""
    found = issues if issues is not None else []
    with _open_path(repo, snapshot, ref) as (fs, parts, entry, _where):
        base = "/" + "/".join(parts)
        if entry.type != EntryType.DIR:
            yield base, entry
            return
        prefix = base.rstrip("/")
        on_error = _collector(found, prefix)
        for event in flr_walk(fs, entry, on_error, recursive=recursive):
            if not event.leave:
                yield f"{prefix}/{event.path}", event.entry


def _collector(issues: list[FlrIssue], prefix: str) -> Callable[[str, Exception], None]:
    def on_error(path: str, exc: Exception) -> None:
        issues.append(FlrIssue(prefix + path, str(exc)))

    return on_error


@dataclass(frozen=True, slots=True)
class FlrRestoreOptions:
    """Where to restore and how."""

    target: Path
    numeric_owner: bool = False


def flr_restore(
    repo: Repository,
    snapshot: Snapshot,
    ref: FlrRef,
    options: FlrRestoreOptions,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> FlrResult:
    """Restore ``ref.path`` into ``options.target``: a folder's content, or the one entry.

    Names that would escape the target, folder loops and unreadable entries are listed in
    the result's issues (the rest is restored); symlinks are restored as symlinks and never
    followed. ``SourceError`` when the filesystem cannot be opened at all.
    """
    progress = progress or NullProgress()
    cancel = cancel or Cancellation()
    result = FlrResult()
    state = ProgressState(phase="restore", started=now())
    with (
        _open_path(repo, snapshot, ref) as (fs, parts, entry, _where),
        FsRestorer(options.target, numeric_owner=options.numeric_owner) as restorer,
        Ticker(progress, state),
    ):
        writer = _Writer(fs, restorer, result, state, cancel)
        base = "/" + "/".join(parts)
        if entry.type == EntryType.DIR:
            on_error = _collector(result.issues, base.rstrip("/"))
            for event in flr_walk(fs, entry, on_error):
                writer.event(event.parts, event.entry, event.leave, base)
        else:
            writer.event((parts[-1],), entry, False, base.rsplit("/", 1)[0])
        issues = restorer.close()
    result.issues.extend(FlrIssue(i.path, str(i.error)) for i in issues)
    progress.done(state)
    return result


class _Writer:
    """Puts walk events into an FsRestorer: folders, files (streamed), links, hard links."""

    def __init__(
        self,
        fs: FlrFilesystem,
        restorer: FsRestorer,
        result: FlrResult,
        state: ProgressState,
        cancel: Cancellation,
    ) -> None:
        self.fs, self.restorer, self.result = fs, restorer, result
        self.state, self.cancel = state, cancel
        self.linked: dict[int, tuple[str, ...]] = {}

    def event(self, parts: tuple[str, ...], entry: FlrEntry, leave: bool, base: str) -> None:
        """Restore one entry (or finish a folder)."""
        self.cancel.check()
        if leave:
            if parts:
                self.restorer.finish_dir(parts)
            return
        self.state.current = "/".join(parts)
        if entry.type == EntryType.DIR:
            self.result.dirs += self.restorer.make_dir(parts, entry)
        elif entry.type == EntryType.FILE:
            self.file(parts, entry, f"{base.rstrip('/')}/{'/'.join(parts)}")
        else:
            self.result.others += self.restorer.make_entry(parts, entry)

    def file(self, parts: tuple[str, ...], entry: FlrEntry, shown: str) -> None:
        if entry.nlink > 1 and entry.inode:
            first = self.linked.get(entry.inode)
            if first is not None and self.restorer.make_hardlink(parts, first):
                self.result.files += 1
                return
            self.linked.setdefault(entry.inode, parts)
        handle = self.restorer.create_file(parts, entry)
        if handle is None:
            return
        offset = 0
        try:
            for block in flr_read(self.fs, entry, path=shown):
                self.cancel.check()
                if not handle.write_at(offset, block):
                    break  # a write failed (disk full...): among the restorer's issues
                offset += len(block)
                self.state.bytes_done += len(block)
        except SourceError as exc:
            self.result.issues.append(FlrIssue(shown, str(exc)))
        finally:
            self.restorer.finish_file(handle)
        self.result.bytes_written += offset
        if not handle.failed:
            self.result.files += 1
            self.state.files_done += 1


def flr_dump(
    repo: Repository,
    snapshot: Snapshot,
    ref: FlrRef,
    out: IO[bytes],
    *,
    cancel: Cancellation | None = None,
) -> FlrResult:
    """Write ``ref.path`` (a file, or a folder and everything below it) to ``out`` as a
    POSIX tar stream with modes, owners, times, symlinks and hard links. Member names are
    relative to the folder that holds ``ref.path``; entries with unsafe names are left out
    (listed in the result's issues)."""
    cancel = cancel or Cancellation()
    result = FlrResult()
    with (
        _open_path(repo, snapshot, ref) as (fs, parts, entry, _where),
        tarfile.open(
            fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_TAR_BLOCK_BYTES
        ) as tar,
    ):
        setattr(tar, "copybufsize", _TAR_BLOCK_BYTES)  # whole blocks, not 16 KiB copies  # noqa: B010
        top = parts[-1] if parts else "."
        base = "/" + "/".join(parts[:-1])
        tarrer = _Tarrer(fs, tar, result, cancel)
        tarrer.add((top,), entry, base)
        if entry.type == EntryType.DIR:
            on_error = _collector(result.issues, "/" + "/".join(parts))
            for event in flr_walk(fs, entry, on_error):
                if not event.leave:
                    tarrer.add((top, *event.parts), event.entry, base)
    return result


_TAR_BLOCK_BYTES = 8 << 20
_TAR_TYPES: dict[str, bytes] = {
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.FILE: tarfile.REGTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
    EntryType.CHARDEV: tarfile.CHRTYPE,
    EntryType.BLOCKDEV: tarfile.BLKTYPE,
}


class _Tarrer:
    def __init__(
        self, fs: FlrFilesystem, tar: tarfile.TarFile, result: FlrResult, cancel: Cancellation
    ) -> None:
        self.fs, self.tar, self.result, self.cancel = fs, tar, result, cancel
        self.linked: dict[int, str] = {}

    def add(self, parts: tuple[str, ...], entry: FlrEntry, base: str) -> None:
        self.cancel.check()
        name = "/".join(parts)
        shown = f"{base.rstrip('/')}/{name}"
        kind = _TAR_TYPES.get(entry.type)
        if kind is None:
            self.result.issues.append(FlrIssue(shown, f"{entry.type} entries are not dumped"))
            return
        info = tarfile.TarInfo(name)
        info.type, info.mode = kind, stat.S_IMODE(entry.mode)
        info.uid, info.gid = entry.uid, entry.gid
        info.mtime = entry.mtime_ns / 1e9
        if entry.type == EntryType.SYMLINK:
            info.linkname = entry.link_target or ""
        if entry.type in (EntryType.CHARDEV, EntryType.BLOCKDEV):
            info.devmajor, info.devminor = os.major(entry.rdev), os.minor(entry.rdev)
        if entry.type != EntryType.FILE:
            self.tar.addfile(info)
            self.result.dirs += entry.type == EntryType.DIR
            self.result.others += entry.type != EntryType.DIR
            return
        if entry.nlink > 1 and entry.inode:
            first = self.linked.get(entry.inode)
            if first is not None:
                info.type, info.linkname = tarfile.LNKTYPE, first
                self.tar.addfile(info)
                self.result.files += 1
                return
            self.linked[entry.inode] = name
        info.size = entry.size
        self.tar.addfile(info, _BlockStream(flr_read(self.fs, entry, path=shown)))
        self.result.files += 1
        self.result.bytes_written += entry.size


class _BlockStream:
    """A ``read(n)`` view of an iterator of blocks (what ``tarfile.addfile`` reads from)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._rest = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        """Exactly ``size`` bytes unless the blocks end first (``tarfile`` insists)."""
        pieces: list[bytes | memoryview] = []
        want = size if size >= 0 else 1 << 62
        while want > 0:
            if not self._rest:
                block = next(self._blocks, b"")
                if not block:
                    break
                if len(block) <= want and not pieces:  # the common case: no copy
                    want -= len(block)
                    pieces.append(block)
                    continue
                self._rest = memoryview(block)
            piece = self._rest[:want]
            self._rest = self._rest[len(piece) :]
            want -= len(piece)
            pieces.append(piece)
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)
