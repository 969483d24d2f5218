"""Value types shared by every layer."""

from __future__ import annotations

import enum
import stat
from typing import NewType

__all__ = ["CHUNK_ID_BYTES", "BlobKind", "ChunkId"]

CHUNK_ID_BYTES = 32

ChunkId = NewType("ChunkId", bytes)
"""Keyed BLAKE3 hash (32 bytes) of a chunk's plaintext; leaks nothing about the content."""


class BlobKind(enum.IntEnum):
    """What a blob in a pack holds; part of the AEAD associated data."""

    DATA = 0
    """A chunk of file or disk content."""
    TREE = 1
    """A serialized directory listing (file tree) or a disk index segment."""


class EntryType(enum.StrEnum):
    """The kinds of file system entry; also the ``type`` of a snapshot's tree nodes."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    CHARDEV = "chardev"
    BLOCKDEV = "blockdev"
    SOCKET = "socket"

    @classmethod
    def from_mode(cls, st_mode: int) -> EntryType:
        """Return the type encoded in an ``st_mode``."""
        return _TYPE_BY_FMT[stat.S_IFMT(st_mode)]


_TYPE_BY_FMT = {
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFIFO: EntryType.FIFO,
    stat.S_IFCHR: EntryType.CHARDEV,
    stat.S_IFBLK: EntryType.BLOCKDEV,
    stat.S_IFSOCK: EntryType.SOCKET,
}
