"""The local listing cache of file backups: the folder states the last backup stored.

A folder's listing (its tree) follows from the metadata of its entries, its subfolders'
tree ids, and the content of its files; a file whose size, times and inode are unchanged
keeps its content (the rule of every incremental backup here). So when a folder is found
exactly as the last backup of the same paths left it, its tree id is known without reading
the parent snapshot's listing, comparing nodes, or encoding anything. This is borg's files
cache at the granularity of folders, keyed by a hash of the folder's state.

Key: keyed BLAKE3 (the repository's chunk-id key, so the file says nothing of names or
content) of the folder's path and the canonical form of its entries' metadata, the
subfolders' tree ids included; value: the tree id. The file format is in docs/format.md.

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
from dataclasses import fields
from operator import attrgetter
from pathlib import Path

from stratavault.repo import Repository
from stratavault.snapshot import Node
from stratavault.types import ChunkId

__all__ = ["ListingCache"]

_VERSION = 1
_MAGIC = b"SVLC"
_PREFIX = struct.Struct("<4sI")
"""magic, length of the JSON head; then the head, the records, a BLAKE2b-256 of all before."""
_RECORD = 64
"""A record: the 32-byte key of a folder's state, then its 32-byte tree id."""
_DIGEST = 32

_STATE_FIELDS = tuple(f.name for f in fields(Node) if f.name not in ("content", "error"))
_node_state = attrgetter(*_STATE_FIELDS)
"""What a node holds besides file content and errors (which follow from it or void it)."""


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

    @property
    def warm(self) -> bool:
        """Whether any folder may be found unchanged."""
        return bool(self._old)

    def key(self, path: str, children: list[Node]) -> bytes:
        """The key of a folder's state: ``children`` with their metadata and subtree ids."""
        state = repr([_node_state(n) for n in children]).encode()
        return self._repo.chunk_id(os.fsencode(path) + b"\0" + state)

    def lookup(self, key: bytes) -> ChunkId | None:
        """The tree id stored for a folder in this state, if the last backup saw it."""
        return self._old.get(key)

    def record(self, key: bytes, tree_id: ChunkId) -> None:
        """Remember that a folder in this state has this tree (none of its files failed)."""
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
