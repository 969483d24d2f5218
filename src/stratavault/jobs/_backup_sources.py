"""What a file backup reads from the file system besides file content: the paths to back
up, the folders above them, and entries turned into tree nodes."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from stratavault.errors import SourceError
from stratavault.snapshot import Node
from stratavault.sources import FsEntry, StandbyWalker, TreeScan, read_exclude_file, walk

__all__ = [
    "ReadAhead",
    "absolute_roots",
    "ancestors",
    "entry_of",
    "node_from_entry",
    "start_read_ahead",
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
    """The metadata of one folder above a backed-up path (its contents are not read).

    A symbolic link there (``/bin`` on Debian 12, for ``backup files /bin/true``) is
    followed: the path was backed up through it, so the snapshot holds a folder of that
    name with the metadata of the folder it leads to, and restore recreates the path as it
    was given."""
    entry = _entry_of(path)
    if entry.type != "symlink":
        return entry
    followed = _entry_of(Path(os.path.realpath(path)))
    return replace(followed, path=entry.path, parent=entry.parent, name=entry.name)


def _entry_of(path: Path) -> FsEntry:
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


@dataclass(slots=True)
class ReadAhead:
    """The processes a file backup starts first thing, so that they import and read while
    the interpreter imports and the repository is opened: the inode read-ahead (see
    :class:`stratavault.sources.TreeScan`) and a standby walker (see
    :class:`stratavault.sources.StandbyWalker`, used by an incremental backup of a large
    tree). Either is None if it could not start (they only make the backup faster)."""

    scan: TreeScan | None
    walker: StandbyWalker | None

    def stop(self) -> None:
        """End both processes, done or not."""
        if self.scan is not None:
            self.scan.stop()
        if self.walker is not None:
            self.walker.stop()


def start_read_ahead(
    paths: tuple[Path, ...],
    *,
    excludes: tuple[str, ...] = (),
    exclude_files: tuple[Path, ...] = (),
    one_file_system: bool = False,
    walker: bool = True,
) -> ReadAhead:
    """Start the read-ahead processes for a backup of ``paths`` (``walker``: with a standby
    walker too). Start them first thing and pass them to ``backup_files``."""
    patterns = [*excludes, *(p for f in exclude_files for p in read_exclude_file(f))]
    roots = absolute_roots(paths)
    scan = standby = None
    try:
        scan = TreeScan(roots, one_file_system=one_file_system, excludes=patterns)
        if walker:
            standby = StandbyWalker(
                [Path(r) for r in roots],
                excludes=excludes,
                exclude_files=exclude_files,
                one_file_system=one_file_system,
            )
    except OSError:
        pass
    return ReadAhead(scan, standby)
