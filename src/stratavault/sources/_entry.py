"""What the walker reports about one file system entry, and the metadata restore needs.

Names and symlink targets are ``str`` made from the file system's bytes with
``surrogateescape`` (what ``os.scandir`` returns), so names that are not UTF-8
survive; ``os.fsencode`` gives the original bytes back. This is the same
convention the snapshot file tree uses.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from stratavault.types import EntryType

__all__ = [
    "UNREAD_XATTRS",
    "EntryMetadata",
    "EntryType",
    "FileStamp",
    "FsEntry",
    "OwnerNames",
    "entry_fields",
    "entry_from_fields",
    "same_file_stat",
]


class EntryMetadata(Protocol):
    """What restore needs to know about an entry besides its content.

    Both :class:`FsEntry` and the snapshot's tree node satisfy this protocol.
    ``mode`` may be a full ``st_mode`` or only its permission bits; only
    ``stat.S_IMODE(mode)`` is used. ``user``/``group`` are ``""`` when unknown.
    """

    @property
    def type(self) -> str:
        """One of the :class:`EntryType` values."""

    @property
    def mode(self) -> int:
        """Permission bits (setuid, setgid and sticky included)."""

    @property
    def uid(self) -> int:
        """Numeric owner."""

    @property
    def gid(self) -> int:
        """Numeric group."""

    @property
    def user(self) -> str:
        """Owner name, or ``""``."""

    @property
    def group(self) -> str:
        """Group name, or ``""``."""

    @property
    def size(self) -> int:
        """Size in bytes (regular files)."""

    @property
    def mtime_ns(self) -> int:
        """Modification time in nanoseconds since the epoch."""

    @property
    def atime_ns(self) -> int:
        """Access time in nanoseconds since the epoch."""

    @property
    def rdev(self) -> int:
        """Device number of character and block devices."""

    @property
    def nlink(self) -> int:
        """Number of hard links; only entries with more than one can be linked to."""

    @property
    def link_target(self) -> str | None:
        """Target of a symbolic link (``str`` with surrogateescape)."""

    @property
    def xattrs(self) -> Mapping[str, bytes]:
        """Extended attributes by name (POSIX ACLs are ``system.posix_acl_*``)."""


@dataclass(frozen=True, slots=True)
class FileStamp:
    """The stat fields that tell whether a file's content may have changed."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileStamp:
        """Take the stamp of a ``stat`` result."""
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def same_file_stat(
    old: FileStamp, new: FileStamp, *, ignore_inode: bool = False, ignore_ctime: bool = False
) -> bool:
    """Tell whether a file is unchanged since ``old`` was taken (same size and times).

    The caller pairs the two stamps by path (the entry at the same place in the
    parent snapshot). ``ignore_inode`` helps on file systems without stable
    inode numbers (FUSE, some network file systems); ``ignore_ctime`` when files
    were copied with their mtime kept.
    """
    return (
        old.size == new.size
        and old.mtime_ns == new.mtime_ns
        and (ignore_ctime or old.ctime_ns == new.ctime_ns)
        and (ignore_inode or old.inode == new.inode)
    )


@dataclass(slots=True)
class FsEntry:
    """One entry found by :func:`walk`, with its ``lstat`` metadata.

    ``path`` and ``parent`` are absolute path strings (no ``pathlib`` objects: a walk
    makes tens of thousands). ``parent`` is the directory holding the entry; for the roots given to
    :func:`walk` (``depth == 0``) that directory was not walked itself.
    ``mode`` holds the permission bits only; the kind is in ``type``.
    """

    path: str
    parent: str
    name: str
    depth: int
    type: EntryType
    mode: int
    uid: int
    gid: int
    user: str
    group: str
    size: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    inode: int
    dev: int
    nlink: int
    rdev: int
    link_target: str | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def name_bytes(self) -> bytes:
        """The entry's name as the file system stores it."""
        return os.fsencode(self.name)

    @property
    def stamp(self) -> FileStamp:
        """The fields :func:`same_file_stat` compares."""
        return FileStamp(self.size, self.mtime_ns, self.ctime_ns, self.inode)


UNREAD_XATTRS: Mapping[str, bytes] = MappingProxyType({})
"""The extended attributes of an entry walked without them (``walk(xattrs=False)``);
tell it by identity (``entry.xattrs is UNREAD_XATTRS``)."""


def entry_fields(entry: FsEntry) -> tuple[Any, ...]:
    """The entry's fields in :class:`FsEntry` order as plain values (the type as its
    string, the xattrs as a dict, ``None`` for :data:`UNREAD_XATTRS`): they pickle and
    marshal fast and small."""
    e = entry
    xattrs = None if e.xattrs is UNREAD_XATTRS else dict(e.xattrs)
    return (
        e.path, e.parent, e.name, e.depth, str(e.type), e.mode, e.uid, e.gid, e.user,
        e.group, e.size, e.mtime_ns, e.atime_ns, e.ctime_ns, e.inode, e.dev, e.nlink,
        e.rdev, e.link_target, xattrs,
    )  # fmt: skip


def entry_from_fields(values: tuple[Any, ...]) -> FsEntry:
    """The entry :func:`entry_fields` gave ``values`` of."""
    entry = FsEntry(*values)
    entry.type = EntryType(entry.type)
    if entry.xattrs is None:
        entry.xattrs = UNREAD_XATTRS
    return entry


def _name_or_empty(lookup: Callable[[int], Any], number: int) -> str:
    try:
        return str(lookup(number)[0])  # pw_name / gr_name
    except KeyError:
        return ""


class OwnerNames:
    """Cached uid/gid to name lookups (``""`` when the id has no name)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        """Return the name of user ``uid``, or ``""``."""
        name = self._users.get(uid)
        if name is None:
            name = self._users[uid] = _name_or_empty(pwd.getpwuid, uid)
        return name

    def group(self, gid: int) -> str:
        """Return the name of group ``gid``, or ``""``."""
        name = self._groups.get(gid)
        if name is None:
            name = self._groups[gid] = _name_or_empty(grp.getgrgid, gid)
        return name
