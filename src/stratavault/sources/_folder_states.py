"""Folder states of a walk: which folders are exactly as a consumer saw them last time.

A folder's state key is a keyed BLAKE2b of its path and the metadata of its entries, each
subfolder's state key included, so it covers the whole subtree (a Merkle tree over
metadata). :class:`FolderStates` turns a walk's entries into records: the entries of
folders in a state the consumer does not know, each followed by :class:`FolderDone` with
the folder's key; and for a folder in a known state, one :class:`KnownFolder` in place of
the folder and everything below it, so neither the consumer nor the pipe between them
handles those entries again.

A folder's records wait until its key is known. A folder whose key is unknown makes its
ancestors' keys unknown too (their keys include it, and a consumer records a folder only
with everything below it), so its records and those of every open folder above it are
passed on at once and never held again: what waits is at most the direct entries of the
open folders. The root ``/`` is never replaced (its entries always pass): a backup of
``/`` puts them into the snapshot's root itself.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import struct
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from stratavault.sources._entry import EntryType, FsEntry, entry_fields, entry_from_fields

__all__ = ["FolderDone", "FolderStates", "KnownFolder", "WalkRecord"]


@dataclass(frozen=True, slots=True)
class FolderDone:
    """Everything below folder ``path`` has been passed on; ``key`` is its state, or None
    when the walk met an error below it (such a state must not be remembered)."""

    path: str
    key: bytes | None


@dataclass(frozen=True, slots=True)
class KnownFolder:
    """A folder in a state the consumer knows, in place of its entry and all below it."""

    entry: FsEntry
    key: bytes
    keys: tuple[bytes, ...]
    """The states of the folders below it (all known too)."""
    entries: int
    """Entries below it."""
    folders: int
    """Folders below it."""
    files: int
    """Regular files below it."""
    file_bytes: int
    """The size of those files."""


WalkRecord = FsEntry | FolderDone | KnownFolder


_COMPACT_AFTER = 256
"""Entries a folder holds as objects before it holds the next ones marshalled: small
folders, most of them, pay nothing for it (an unchanged backup drops what they held)."""


@dataclass(slots=True)
class _Open:
    """A folder whose subtree is being walked. What it holds is kept compact (a folder of
    thousands of files holds them all until its key is known): entries beyond the first
    ``_COMPACT_AFTER`` as marshalled field tuples, states marshalled."""

    entry: FsEntry
    held: list[WalkRecord | bytes]
    states: list[bytes] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    clean: bool = True
    passing: bool = False
    """Its key cannot be known any more: its records pass on at once."""
    entries: int = 0
    folders: int = 0
    files: int = 0
    file_bytes: int = 0


def _state(e: FsEntry) -> tuple[Any, ...]:
    """What a tree node holds of an entry: content aside, which follows from size, times
    and inode; extended attributes aside too, as setting or removing one (an ACL too)
    changes the entry's ctime, so the walk need not read them for entries it passes
    over."""
    return (
        e.name, str(e.type), e.mode, e.uid, e.gid, e.user, e.group, e.size, e.mtime_ns,
        e.atime_ns, e.ctime_ns, e.inode, e.dev, e.nlink, e.rdev, e.link_target,
    )  # fmt: skip


class FolderStates:
    """Feed it a walk's entries in walk order (and :meth:`error` for each walk error);
    it gives the records to pass on. ``known``: the keys the consumer knows; ``secret``:
    the key of the keyed hash (up to 64 bytes)."""

    def __init__(self, known: Container[bytes], secret: bytes) -> None:
        self._known = known
        self._secret = secret
        self._open: list[_Open] = []

    def error(self) -> None:
        """The walk met an error at the current place: no open folder's state is kept."""
        for folder in self._open:
            folder.clean = False

    def feed(self, entry: FsEntry) -> list[WalkRecord]:
        """Take the next entry; return the records that may go on now."""
        out: list[WalkRecord] = []
        while self._open and (entry.depth == 0 or self._open[-1].entry.path != entry.parent):
            self._close(out)
        if self._open:
            top = self._open[-1]
            if entry.type != EntryType.DIR:
                top.states.append(marshal.dumps(_state(entry), 2))
                top.entries += 1
                if entry.type == EntryType.FILE:
                    top.files, top.file_bytes = top.files + 1, top.file_bytes + entry.size
        if entry.type != EntryType.DIR:
            self._hold(entry, out)
        elif entry.path == "/":
            out.append(entry)
            self._open.append(_Open(entry, [], passing=True))
        else:
            self._open.append(_Open(entry, [entry]))
        return out

    def finish(self) -> list[WalkRecord]:
        """The records still held, at the end of the walk."""
        out: list[WalkRecord] = []
        while self._open:
            self._close(out)
        return out

    def _hold(self, record: WalkRecord, out: list[WalkRecord]) -> None:
        """Hold a record in the innermost open folder, or pass it on if that one passes."""
        if self._open and not self._open[-1].passing:
            held = self._open[-1].held
            if isinstance(record, FsEntry) and len(held) >= _COMPACT_AFTER:
                held.append(marshal.dumps(entry_fields(record), 2))
            else:
                held.append(record)
        else:
            out.append(record)

    def _close(self, out: list[WalkRecord]) -> None:
        folder = self._open.pop()
        hasher = hashlib.blake2b(key=self._secret, digest_size=32)
        hasher.update(os.fsencode(folder.entry.path) + b"\0")
        _hash_marshalled_list(hasher, folder.states)
        key = hasher.digest()
        parent = self._open[-1] if self._open else None
        if parent is not None:
            parent.states.append(marshal.dumps((*_state(folder.entry), key), 2))
        if folder.clean and not folder.passing and key in self._known:
            known = KnownFolder(
                folder.entry, key, tuple(folder.keys), folder.entries, folder.folders,
                folder.files, folder.file_bytes,
            )  # fmt: skip
            if parent is not None:
                parent.keys += (key, *folder.keys)
                parent.entries += 1 + folder.entries
                parent.folders += 1 + folder.folders
                parent.files += folder.files
                parent.file_bytes += folder.file_bytes
            self._hold(known, out)
            return
        for above in self._open:  # their keys include this one: unknown too
            if not above.passing:
                out += map(_unpacked, above.held)
                above.held, above.passing = [], True
        out += map(_unpacked, folder.held)
        out.append(FolderDone(folder.entry.path, key if folder.clean else None))


def _hash_marshalled_list(hasher: Any, items: list[bytes]) -> None:
    """Hash ``marshal.dumps(list, 2)`` of the values marshalled in ``items`` (version 2
    writes a list as its type, its length and its items, with no back-references)."""
    hasher.update(b"[" + struct.pack("<i", len(items)))
    for item in items:
        hasher.update(item)


def _unpacked(record: WalkRecord | bytes) -> WalkRecord:
    return entry_from_fields(marshal.loads(record)) if isinstance(record, bytes) else record
