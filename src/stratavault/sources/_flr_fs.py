"""Filesystems inside a disk image, read with the ``dissect`` libraries behind our own interface.

One adapter per family (ext2/3/4, XFS, FAT12/16/32, NTFS) turns the library's nodes into
:class:`FlrEntry` values (name, type, mode, owner, times, size, link target, inode, link
count) and opens file content as a stream. ``dissect`` is imported only when a filesystem
is opened. Everything read here is untrusted: the adapters report, they never judge;
:mod:`stratavault.sources._flr` checks names, loops and sizes.
"""

from __future__ import annotations

import datetime as dt
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from stratavault.errors import SourceError
from stratavault.types import EntryType

__all__ = [
    "BROKEN",
    "FILESYSTEMS",
    "FlrEntry",
    "FlrFilesystem",
    "broken_entry",
    "detect_filesystem",
    "open_filesystem",
]

FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "fat12", "fat16", "fat32", "ntfs")
"""Filesystems that can be read (Btrfs when ``dissect.btrfs`` is installed)."""

MAX_LINK_BYTES = 4096
"""A symlink target longer than this is corrupt (Linux allows 4095 bytes)."""

_TYPES = {
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFCHR: EntryType.CHARDEV,
    stat.S_IFBLK: EntryType.BLOCKDEV,
    stat.S_IFSOCK: EntryType.SOCKET,
}
_NO_XATTRS: Mapping[str, bytes] = {}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(slots=True)
class FlrEntry:
    """One entry of a filesystem in a disk image (satisfies ``EntryMetadata``)."""

    name: str
    """The entry's name as stored (``str`` with surrogateescape; unchecked)."""
    type: str
    """An :class:`EntryType` value ("file", "dir", "symlink", ...)."""
    mode: int
    """Permission bits (FAT and NTFS have none: 0o755 for folders, 0o644 for files)."""
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    inode: int = 0
    """Inode (or MFT record, or first cluster) number; 0 when the filesystem has none."""
    link_target: str | None = None
    rdev: int = 0
    user: str = ""
    group: str = ""
    xattrs: Mapping[str, bytes] = field(default_factory=lambda: _NO_XATTRS)
    node: Any = field(default=None, repr=False, compare=False)
    """The library's object for this entry (used by the adapter only)."""


class FlrFilesystem:
    """A filesystem read out of a file-like volume: walk, stat and read; not thread-safe.

    Subclasses implement :meth:`root`, :meth:`iterdir` and :meth:`open`. Library errors
    come out as they are; the caller names the path.
    """

    kind = ""
    """One of :data:`FILESYSTEMS`."""

    def root(self) -> FlrEntry:
        """The root folder."""
        raise NotImplementedError

    def iterdir(self, folder: FlrEntry) -> Iterator[FlrEntry]:
        """The entries of ``folder``, without ``.`` and ``..``, in on-disk order."""
        raise NotImplementedError

    def open(self, entry: FlrEntry) -> BinaryIO:
        """A stream of a regular file's content (``read`` of large blocks is efficient)."""
        raise NotImplementedError


BROKEN = "broken"
"""The ``type`` of an entry whose metadata could not be read (``node`` holds the reason)."""


def broken_entry(name: str, exc: BaseException) -> FlrEntry:
    """An entry listed in a folder whose own metadata is unreadable (reported, not restored)."""
    text = str(exc).strip().splitlines()
    why = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return FlrEntry(name=name, type=BROKEN, mode=0, node=why)


def _guarded(name: str, make: Callable[[str, Any], FlrEntry], node: Any) -> FlrEntry:
    try:
        return make(name, node)
    except Exception as exc:  # the libraries' parse errors have no common base
        return broken_entry(name, exc)


def _type_of(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), EntryType.FILE)


class _UnixFs(FlrFilesystem):
    """ext2/3/4 and XFS: the library's INode has iterdir/open/link and the timestamps."""

    def __init__(self, fs: Any, kind: str) -> None:
        self.fs, self.kind = fs, kind

    def root(self) -> FlrEntry:
        return self._entry("", self.fs.get(self._root_inum))

    _root_inum = 2

    def iterdir(self, folder: FlrEntry) -> Iterator[FlrEntry]:
        dots = {".", ".."}  # the folder's own two; a second "." or ".." is an attack: yield it
        for node in folder.node.iterdir():
            name = node.filename
            if name in dots:
                dots.discard(name)
                continue
            yield _guarded(name if name is not None else "", self._entry, node)

    def open(self, entry: FlrEntry) -> BinaryIO:
        stream: BinaryIO = entry.node.open()
        return stream

    def _entry(self, name: str, node: Any) -> FlrEntry:
        raise NotImplementedError

    def _unix_entry(
        self, name: str, node: Any, mode: int, uid: int, gid: int, nlink: int, rdev: int
    ) -> FlrEntry:
        """The entry of an inode of a Unix filesystem (ext, XFS), from its raw fields."""
        kind = _type_of(mode)
        size = node.size
        return FlrEntry(
            name=name,
            type=kind,
            mode=stat.S_IMODE(mode),
            uid=uid,
            gid=gid,
            size=size if kind == EntryType.FILE else 0,
            mtime_ns=node.mtime_ns,
            atime_ns=node.atime_ns,
            ctime_ns=node.ctime_ns,
            nlink=nlink,
            inode=node.inum,
            link_target=self._link(node, size) if kind == EntryType.SYMLINK else None,
            rdev=rdev,
            node=node,
        )

    @staticmethod
    def _link(node: Any, size: int) -> str:
        if size > MAX_LINK_BYTES:
            raise ValueError(f"symlink target of {size} bytes is too long (corrupt inode)")
        target: str = node.link
        return target


class _ExtFs(_UnixFs):
    def _entry(self, name: str, node: Any) -> FlrEntry:
        raw = node.inode
        rdev = 0
        if _type_of(raw.i_mode) in (EntryType.CHARDEV, EntryType.BLOCKDEV):
            rdev = _ext_rdev(bytes(raw.i_block))
        uid = raw.i_uid | (raw.i_uid_high << 16)
        gid = raw.i_gid | (raw.i_gid_high << 16)
        return self._unix_entry(name, node, raw.i_mode, uid, gid, raw.i_links_count, rdev)


def _ext_rdev(block: bytes) -> int:
    """Device number of an ext device inode (old 16-bit or new 32-bit encoding)."""
    old = int.from_bytes(block[0:4], "little")
    if old:
        return ((old >> 8) & 0xFF) << 8 | (old & 0xFF)
    new = int.from_bytes(block[4:8], "little")
    major, minor = (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)
    return (major << 8) | minor if major < 256 and minor < 256 else (major << 20) | minor


class _XfsFs(_UnixFs):
    def __init__(self, fs: Any, kind: str) -> None:
        super().__init__(fs, kind)
        self._root_inum = fs.sb.sb_rootino

    def _entry(self, name: str, node: Any) -> FlrEntry:
        raw = node.inode
        return self._unix_entry(name, node, raw.di_mode, raw.di_uid, raw.di_gid, raw.di_nlink, 0)


class _BtrfsFs(FlrFilesystem):
    """Btrfs: the default subvolume; other subvolumes appear as folders inside it.

    Inode numbers restart in every subvolume, so an entry's ``inode`` is the subvolume id
    and the inode number together (what hard links and loop detection compare).
    """

    kind = "btrfs"

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def root(self) -> FlrEntry:
        return self._entry("", self.fs.root)

    def iterdir(self, folder: FlrEntry) -> Iterator[FlrEntry]:
        dots = {".", ".."}
        for name, node in folder.node.iterdir():
            if name in dots:
                dots.discard(name)
                continue
            yield _guarded(name, self._entry, node)

    def open(self, entry: FlrEntry) -> BinaryIO:
        stream: BinaryIO = entry.node.open()
        return stream

    def _entry(self, name: str, node: Any) -> FlrEntry:
        raw = node.inode
        kind = _type_of(raw.mode)
        size = node.size
        return FlrEntry(
            name=name,
            type=kind,
            mode=stat.S_IMODE(raw.mode),
            uid=raw.uid,
            gid=raw.gid,
            size=size if kind == EntryType.FILE else 0,
            mtime_ns=node.mtime_ns,
            atime_ns=node.atime_ns,
            ctime_ns=node.ctime_ns,
            nlink=raw.nlink,
            inode=(node.subvolume.objectid << 40) | node.inum,
            link_target=_UnixFs._link(node, size) if kind == EntryType.SYMLINK else None,
            rdev=raw.rdev if kind in (EntryType.CHARDEV, EntryType.BLOCKDEV) else 0,
            node=node,
        )


def _ns(when: dt.datetime) -> int:
    """Nanoseconds since the epoch of a naive (FAT: local, taken as UTC) or aware datetime."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


class _FatFs(FlrFilesystem):
    def __init__(self, fs: Any, kind: str) -> None:
        self.fs, self.kind = fs, kind

    def root(self) -> FlrEntry:
        return FlrEntry(name="", type=EntryType.DIR, mode=0o755, node=self.fs.root)

    def iterdir(self, folder: FlrEntry) -> Iterator[FlrEntry]:
        dots = {".", ".."}
        for node in folder.node.iterdir():
            name = node.name if node.ldirents else _short_name_case(node)
            if node.is_volume_id():
                continue
            if name in dots and not node.ldirents:
                dots.discard(name)
                continue
            yield _guarded(name, self._entry, node)

    @staticmethod
    def _entry(name: str, node: Any) -> FlrEntry:
        is_dir = node.is_directory()
        return FlrEntry(
            name=name,
            type=EntryType.DIR if is_dir else EntryType.FILE,
            mode=0o755 if is_dir else 0o644,
            size=0 if is_dir else node.size,
            mtime_ns=_ns(node.mtime),
            atime_ns=_ns(node.atime),
            ctime_ns=_ns(node.ctime),
            inode=node.cluster or 0,
            node=node,
        )

    def open(self, entry: FlrEntry) -> BinaryIO:
        stream: BinaryIO = entry.node.open()
        return stream


def _short_name_case(node: Any) -> str:
    """An 8.3 name as Windows and Linux show it: the lower-case flags of DIR_NTRes applied."""
    name: str = node.short_name
    flags = int(node.dirent.DIR_NTRes)
    base, dot, ext = name.partition(".")
    if flags & 0x08:
        base = base.lower()
    if flags & 0x10:
        ext = ext.lower()
    return base + dot + ext


class _NtfsFs(FlrFilesystem):
    kind = "ntfs"

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def root(self) -> FlrEntry:
        return FlrEntry(name="", type=EntryType.DIR, mode=0o755, node=self.fs.mft.get(5), inode=5)

    def iterdir(self, folder: FlrEntry) -> Iterator[FlrEntry]:
        dots = {"."}  # the root's entry for itself
        for index_entry in folder.node.iterdir(ignore_dos=True):
            name = index_entry.attribute.file_name
            if name in dots and folder.inode == 5:
                dots.discard(name)
                continue
            try:
                record = index_entry.dereference()
            except Exception as exc:  # a dangling or corrupt MFT reference
                yield broken_entry(name, exc)
                continue
            if record.segment < 24 and folder.inode == 5:  # $MFT, $Bitmap... metadata files
                continue
            yield _guarded(name, self._entry, record)

    def _entry(self, name: str, record: Any) -> FlrEntry:
        info = record.attributes.STANDARD_INFORMATION
        target = None
        if record.is_symlink() or record.is_mount_point():
            kind, mode, size = EntryType.SYMLINK, 0o777, 0
            target = record.reparse_point_name.replace("\\", "/")
            if record.attributes.REPARSE_POINT.absolute:
                target = "/" + target
        elif record.is_dir():
            kind, mode, size = EntryType.DIR, 0o755, 0
        else:
            kind, mode, size = EntryType.FILE, 0o644, record.size()
        return FlrEntry(
            name=name,
            type=kind,
            mode=mode,
            size=size,
            mtime_ns=info.last_modification_time_ns,
            atime_ns=info.last_access_time_ns,
            ctime_ns=info.last_change_time_ns,
            nlink=record.header.ReferenceCount,
            inode=record.segment,
            link_target=target,
            node=record,
        )

    def open(self, entry: FlrEntry) -> BinaryIO:
        stream: BinaryIO = entry.node.open()
        return stream


def detect_filesystem(head: bytes) -> str:
    """The filesystem (or volume) whose signature starts ``head`` (the first 68 KiB of a
    volume): one of :data:`FILESYSTEMS`, "btrfs", "lvm2", "swap", or "" when unknown."""
    if head[1080:1082] == b"\x53\xef":
        compat = int.from_bytes(head[1116:1120], "little")
        incompat = int.from_bytes(head[1120:1124], "little")
        if incompat & 0x2C0:  # extents, 64bit or flex_bg
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[0x10040:0x10048] == b"_BHRfS_M":
        return "btrfs"
    if head[512:520] == b"LABELONE" or head[:8] == b"LABELONE":
        return "lvm2"
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if head[510:512] == b"\x55\xaa":
        for offset in (82, 54):
            label = head[offset : offset + 8]
            if label in (b"FAT32   ", b"FAT16   ", b"FAT12   "):
                return label.decode().strip().lower()
    return ""


def open_filesystem(fh: BinaryIO, kind: str, *, where: str) -> FlrFilesystem:
    """Open filesystem ``kind`` (from :func:`detect_filesystem`) on ``fh``.

    ``SourceError`` naming ``where`` when the kind is not supported or the filesystem is
    corrupt (the library's own complaint is in the message).
    """
    if kind not in FILESYSTEMS:
        what = f"a {kind} filesystem" if kind else "no filesystem this program knows"
        raise SourceError(f"opening {where} - it holds {what} (readable: {', '.join(FILESYSTEMS)})")
    try:
        fs = _open(fh, kind)
        if fs.root().type != EntryType.DIR:
            raise ValueError("the root is not a folder")
        return fs
    except ImportError as exc:
        raise SourceError(f"opening {where} - the dissect library for {kind} is missing") from exc
    except Exception as exc:  # the library's parse errors have no common base
        raise SourceError(f"opening {kind} filesystem on {where} - corrupt: {_why(exc)}") from exc


def _open(fh: BinaryIO, kind: str) -> FlrFilesystem:
    """The adapter for ``kind``, importing its dissect library now."""
    if kind.startswith("ext"):
        from dissect.extfs import ExtFS

        return _ExtFs(ExtFS(fh), kind)
    if kind == "xfs":
        from dissect.xfs import XFS

        return _XfsFs(XFS(fh), kind)
    if kind.startswith("fat"):
        from dissect.fat import FATFS

        return _FatFs(FATFS(fh), kind)
    if kind == "btrfs":
        from dissect.btrfs import Btrfs

        return _BtrfsFs(Btrfs(fh))
    from dissect.ntfs import NTFS

    return _NtfsFs(NTFS(fh))


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
