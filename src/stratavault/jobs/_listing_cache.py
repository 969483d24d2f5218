"""The local listing cache of file backups: the folder states the last backup stored.

A folder's listing (its tree) follows from the metadata of everything below it and the
content of its files; a file whose size, times and inode are unchanged keeps its content
(the rule of every incremental backup here). So when a folder is found exactly as the last
backup of the same paths left it, its tree id is known without reading the parent
snapshot's listing, comparing nodes, or even passing its entries from the walk to the
backup. This is borg's files cache at the granularity of folders, keyed by a hash of the
folder's whole subtree (see :class:`stratavault.sources.FolderStates`).

Key: the folder's state key, a keyed hash (the secret derives from the repository's key,
so the file says nothing of names or content); value: the tree id. The file format is in
docs/format.md.

The cache is used only by a backup whose parent snapshot is the one it was written for,
and only while every index object it saw still exists: a prune or ``repair index`` (the
only writers that can drop chunks) replace index objects. Anything unreadable, damaged or
of another version is ignored: the backup then compares with the parent's listings.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

from stratavault.repo import Repository
from stratavault.types import ChunkId

__all__ = ["ListingCache"]

_VERSION = 1
_MAGIC = b"SVLC"
_PREFIX = struct.Struct("<4sI")
"""magic, length of the JSON head; then the head, the records, a BLAKE2b-256 of all before."""
_RECORD = 64
"""A record: the 32-byte key of a folder's state, then its 32-byte tree id."""
_DIGEST = 32
_SECRET_INPUT = b"stratavault listing cache: folder state key"


class ListingCache:
    """Folder state -> tree id, as the last backup of the same paths stored them.

    Lookups answer from the cache that was loaded; :meth:`record` collects the states of
    this backup, and :meth:`save` replaces the file with them once its snapshot is saved.
    """

    def __init__(self, repo: Repository, path: Path | None, old: dict[bytes, ChunkId]) -> None:
        self._repo = repo
        self._path = path
        self._old = old
        self._new: dict[bytes, ChunkId] = {}
        self.secret: bytes = repo.chunk_id(_SECRET_INPUT)
        """The key of the folder state hash."""

    @classmethod
    def load(
        cls, repo: Repository, host: str, paths: list[str], parent_id: str | None
    ) -> ListingCache:
        """The cache of backups of ``paths`` from ``host``; empty unless it was written for
        snapshot ``parent_id`` and every index object it saw is still there."""
        directory = repo.cache_dir
        if directory is None:
            return cls(repo, None, {})
        source = repo.chunk_id(json.dumps([host, sorted(paths)]).encode()).hex()[:32]
        path = directory / "listings" / f"{source}.cache"
        old = _read(path, parent_id, repo.index_objects()) if parent_id else None
        return cls(repo, path, old or {})

    def known(self) -> set[bytes]:
        """The folder states the last backup stored."""
        return set(self._old)

    def reuse(self, key: bytes, below: Iterable[bytes]) -> ChunkId:
        """The tree id of a folder in a known state; it and the known states ``below`` it
        are remembered for the next backup."""
        tree = self._new[key] = self._old[key]
        for inner in below:
            if (found := self._old.get(inner)) is not None:
                self._new[inner] = found
        return tree

    def record(self, key: bytes, tree_id: ChunkId) -> None:
        """Remember that a folder in this state has this tree (nothing below it failed)."""
        self._new[key] = tree_id

    def save(self, snapshot_id: str) -> None:
        """Replace the file with this backup's folders (a failure only costs speed)."""
        if self._path is None:
            return
        head = json.dumps(
            {
                "version": _VERSION,
                "snapshot": snapshot_id,
                "index_objects": sorted(self._repo.index_objects()),
                "entries": len(self._new),
            }
        ).encode()
        body = b"".join([_PREFIX.pack(_MAGIC, len(head)), head])
        body += b"".join(k + t for k, t in self._new.items())
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                fh.write(body)
                fh.write(hashlib.blake2b(body, digest_size=_DIGEST).digest())
            os.replace(tmp, self._path)
        except OSError:
            tmp.unlink(missing_ok=True)


def _read(
    path: Path, snapshot_id: str, index_objects: frozenset[str]
) -> dict[bytes, ChunkId] | None:
    """The records of a cache file if it is intact and still valid, else None."""
    try:
        data = path.read_bytes()
        body, digest = data[:-_DIGEST], data[-_DIGEST:]
        if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
            return None
        magic, head_len = _PREFIX.unpack_from(body)
        start = _PREFIX.size + head_len
        head = json.loads(body[_PREFIX.size : start])
        count = head["entries"]
        if magic != _MAGIC or head["version"] != _VERSION or len(body) - start != count * _RECORD:
            return None
        if head["snapshot"] != snapshot_id or not set(head["index_objects"]) <= index_objects:
            return None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    ends = range(start, len(body), _RECORD)
    return {body[i : i + 32]: ChunkId(body[i + 32 : i + _RECORD]) for i in ends}
