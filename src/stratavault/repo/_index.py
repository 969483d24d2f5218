"""The client's chunk index (bounded memory per chunk) and index objects on the backend."""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from stratavault.errors import IntegrityError, UnsupportedFormatError
from stratavault.repo import _formats as F
from stratavault.repo._dtypes import HEADER_ENTRY, INDEX_ENTRY
from stratavault.repo._packs import pack_name

__all__ = ["ChunkIndex", "Entry", "decode_index_object", "encode_index_object", "mark_held"]

MERGE_EVERY = 50_000
"""Entries added this session are merged into a sorted run after this many."""

Array = npt.NDArray[np.void]
_CACHE_VERSION = 2
_CACHE_NAME = "index.cache"
_CACHE_MAGIC = b"SVIC"
_CACHE_PREFIX = struct.Struct("<4sII")
"""magic, length of the JSON head, offset of the entries (the head is padded with spaces)."""


class Entry(NamedTuple):
    """Where one chunk is stored."""

    pack: int
    kind: int
    offset: int
    stored: int
    raw: int


def _search(
    ids: npt.NDArray[np.bytes_], keys: npt.NDArray[np.bytes_]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
    """Where each of ``keys`` is or would be in the sorted (non-empty) ``ids``, and
    whether it is there."""
    pos = np.minimum(ids.searchsorted(keys), len(ids) - 1)
    return pos, ids[pos] == keys


class _Holder(Protocol):
    def __contains__(self, chunk_id: bytes) -> bool: ...


def mark_held(found: npt.NDArray[np.bool_], keys: npt.NDArray[np.bytes_], held: _Holder) -> None:
    """Set ``found`` for each id of ``keys`` (``S32``) not found yet that ``held`` holds."""
    raw = keys.tobytes()  # not keys[i]: numpy drops an S32 item's trailing zeros
    for i in np.flatnonzero(~found).tolist():
        found[i] = raw[32 * i : 32 * i + 32] in held


def _sorted(entries: Array) -> Array:
    order = np.argsort(entries["id"], kind="stable")
    return entries[order]


class ChunkIndex:
    """Chunk id -> location, in sorted numpy runs plus a small dict of fresh entries.

    Each entry costs 49 bytes in a run. Runs are merged LSM-style (a run is merged
    into the previous one when that one is at most twice its size), so a lookup
    does a few binary searches. Not thread-safe: the repository serializes access.
    """

    def __init__(self) -> None:
        self.packs: list[str] = []
        self._pack_numbers: dict[str, int] = {}
        self._runs: list[Array] = []
        self._ids: list[npt.NDArray[np.bytes_]] = []
        """The id column of each run, newest first (views made once, not per lookup)."""
        self._pending: dict[bytes, Entry] = {}

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs) + len(self._pending)

    @property
    def nbytes(self) -> int:
        """Bytes held by the sorted runs (mapped or in memory)."""
        return sum(run.nbytes for run in self._runs)

    def pack_number(self, name: str) -> int:
        """Number of pack ``name`` in :attr:`packs`, adding it if new."""
        number = self._pack_numbers.get(name)
        if number is None:
            number = self._pack_numbers[name] = len(self.packs)
            self.packs.append(name)
        return number

    def add(self, chunk_id: bytes, entry: Entry) -> None:
        """Record one chunk location (kept in a dict until the next merge)."""
        self._pending[chunk_id] = entry
        if len(self._pending) >= MERGE_EVERY:
            self.merge_pending()

    def add_entries(self, entries: Array) -> None:
        """Add an INDEX_ENTRY array whose ``pack`` column uses this index's numbers."""
        if len(entries):
            self._push_run(_sorted(entries))

    def add_pack(self, name: str, header: Array) -> None:
        """Add the HEADER_ENTRY records of pack ``name``."""
        entries = np.zeros(len(header), dtype=INDEX_ENTRY)
        for field in HEADER_ENTRY.names or ():
            entries[field] = header[field]
        entries["pack"] = self.pack_number(name)
        self.add_entries(entries)

    def merge_pending(self) -> None:
        """Turn the dict of fresh entries into a sorted run."""
        if not self._pending:
            return
        entries = np.zeros(len(self._pending), dtype=INDEX_ENTRY)
        entries["id"] = list(self._pending.keys())
        values = np.array(list(self._pending.values()), dtype=np.uint32)
        for column, field in enumerate(Entry._fields):
            entries[field] = values[:, column]
        self._pending.clear()
        self._push_run(_sorted(entries))

    def _push_run(self, run: Array) -> None:
        self._runs.append(run)
        while len(self._runs) >= 2 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            last = self._runs.pop()
            prev = self._runs.pop()
            self._runs.append(_sorted(np.concatenate([prev, last])))
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the id columns after the runs changed (newest run first)."""
        self._ids = [run["id"] for run in reversed(self._runs)]  # views, no copies

    def _find(self, chunk_id: bytes) -> tuple[int, int] | None:
        """``(run number, position)`` of ``chunk_id`` in the sorted runs (newest first)."""
        if not self._ids:
            return None
        stripped = chunk_id.rstrip(b"\0")  # numpy shows S32 values without trailing NULs
        for run_number, ids in enumerate(self._ids):
            pos = int(ids.searchsorted(chunk_id))
            if pos < len(ids) and ids[pos] == stripped:
                return run_number, pos
        return None

    def lookup(self, chunk_id: bytes) -> Entry | None:
        """Location of ``chunk_id``, or None."""
        found = self._pending.get(chunk_id)
        if found is not None:
            return found
        where = self._find(chunk_id)
        if where is None:
            return None
        rec = self._runs[len(self._runs) - 1 - where[0]][where[1]]
        return Entry(
            int(rec["pack"]),
            int(rec["kind"]),
            int(rec["offset"]),
            int(rec["stored"]),
            int(rec["raw"]),
        )

    def lookup_many(self, chunk_ids: Sequence[bytes]) -> list[Entry | None]:
        """:meth:`lookup` of each of ``chunk_ids``, with one vectorized binary search per
        run for them all (a restore locates tens of thousands of chunks at once)."""
        if len(chunk_ids) == 1:  # one id: the scalar search is faster (a read's chunk)
            return [self.lookup(chunk_ids[0])]
        found: list[Entry | None] = [self._pending.get(c) for c in chunk_ids]
        todo = [i for i, e in enumerate(found) if e is None and len(chunk_ids[i]) == 32]
        if not todo or not self._runs:
            return found
        keys = np.frombuffer(b"".join(chunk_ids[i] for i in todo), dtype="S32")
        open_ = np.ones(len(keys), dtype=bool)
        for number, ids in enumerate(self._ids):  # newest first, as _find
            if not len(ids):
                continue
            pos, present = _search(ids, keys)
            hit = open_ & present
            if not hit.any():
                continue
            open_ &= ~hit
            rows = self._runs[len(self._runs) - 1 - number][pos[hit]]
            columns = zip(*(rows[field].tolist() for field in Entry._fields), strict=True)
            for k, values in zip(np.flatnonzero(hit).tolist(), columns, strict=True):
                found[todo[k]] = Entry(*values)
        return found

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._pending or self._find(chunk_id) is not None

    def missing(self, chunk_ids: list[bytes]) -> set[bytes]:
        """The ids of ``chunk_ids`` that are not in the index: one vectorized binary search
        per run for the whole list (a folder's files at once), not one per id."""
        wanted = [c for c in chunk_ids if c not in self._pending] if self._pending else chunk_ids
        if not wanted:
            return set()
        joined = b"".join(wanted)
        if len(joined) != 32 * len(wanted):  # not all chunk ids: none of them can be here
            return {c for c in wanted if len(c) != 32 or c not in self}
        found = self._in_runs(np.frombuffer(joined, dtype="S32"))
        return set() if found.all() else {wanted[i] for i in np.flatnonzero(~found)}

    def present(self, keys: npt.NDArray[np.bytes_]) -> npt.NDArray[np.bool_]:
        """One bool per 32-byte id of ``keys`` (an ``S32`` array): whether it is in the
        index (``missing`` for ids already in an array: a disk's, say)."""
        found = self._in_runs(keys)
        if self._pending:
            mark_held(found, keys, self._pending)
        return found

    def _in_runs(self, keys: npt.NDArray[np.bytes_]) -> npt.NDArray[np.bool_]:
        """Whether each of ``keys`` is in a sorted run: one vectorized search per run."""
        found = np.zeros(len(keys), dtype=bool)
        for ids in self._ids:
            if len(ids):
                found |= _search(ids, keys)[1]
        return found

    def merged(self) -> Array:
        """All entries as one sorted array (merges everything)."""
        self.merge_pending()
        while len(self._runs) > 1:
            last = self._runs.pop()
            prev = self._runs.pop()
            self._runs.append(_sorted(np.concatenate([prev, last])))
        self._reindex()
        return self._runs[0] if self._runs else np.zeros(0, dtype=INDEX_ENTRY)

    def without_packs(self, removed: set[str]) -> ChunkIndex:
        """A new index holding every entry except those in the ``removed`` packs."""
        arr = self.merged()
        new = ChunkIndex()
        remap = np.full(max(len(self.packs), 1), -1, dtype=np.int64)
        for number, name in enumerate(self.packs):
            if name not in removed:
                remap[number] = new.pack_number(name)
        kept = arr[remap[arr["pack"]] >= 0] if len(arr) else arr
        kept["pack"] = remap[kept["pack"]]
        new.add_entries(kept)
        return new

    def pack_ends(self) -> dict[str, int]:
        """For every pack with entries, where its last blob ends (the header follows)."""
        arr = self.merged()
        ends = np.zeros(len(self.packs), dtype=np.int64)
        np.maximum.at(ends, arr["pack"], arr["offset"].astype(np.int64) + arr["stored"])
        return {self.packs[n]: int(ends[n]) for n in np.flatnonzero(ends)}

    def by_pack(self) -> list[tuple[str, Array]]:
        """``(pack name, its entries)`` for every pack that has entries."""
        arr = self.merged()
        if not len(arr):
            return []
        arr = arr[np.argsort(arr["pack"], kind="stable")]
        cuts = np.flatnonzero(arr["pack"][1:] != arr["pack"][:-1]) + 1
        return [(self.packs[int(part["pack"][0])], part) for part in np.split(arr, cuts)]

    def totals(self) -> tuple[int, int, int]:
        """Number of chunks, their raw bytes, number of packs with chunks."""
        arr = self.merged()
        return len(arr), int(arr["raw"].sum(dtype=np.uint64)), len(np.unique(arr["pack"]))

    # --- local cache ----------------------------------------------------------------------------

    def save(self, directory: Path, index_objects: Iterable[str]) -> None:
        """Write the cache into ``directory``: one file, replaced atomically. (Two files,
        replaced one after the other, could pair one process's entries with another's list
        of covered index objects when backups and prune saved at once: chunks then looked
        missing.)"""
        directory.mkdir(parents=True, exist_ok=True)
        arr = self.merged()
        meta = {
            "version": _CACHE_VERSION,
            "index_objects": sorted(index_objects),
            "packs": self.packs,
            "entries": len(arr),
        }
        head = json.dumps(meta).encode()
        padded = -(-(_CACHE_PREFIX.size + len(head)) // 64) * 64  # entries 64-byte aligned
        tmp = directory / f"{_CACHE_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
        with tmp.open("wb") as fh:
            fh.write(_CACHE_PREFIX.pack(_CACHE_MAGIC, len(head), padded))
            fh.write(head.ljust(padded - _CACHE_PREFIX.size, b" "))
            fh.write(arr.data)  # no copy: 490 MB for 10 million entries
        os.replace(tmp, directory / _CACHE_NAME)
        for old in ("index.npy", "index.json"):  # the two files of cache version 1
            (directory / old).unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path) -> tuple[ChunkIndex, set[str]] | None:
        """Load a cache written by :meth:`save` (entries memory-mapped), or None if it is
        absent or unusable (then the index is read from the backend)."""
        path = directory / _CACHE_NAME
        try:
            # One open for the head and the entries: another process may replace the file
            # in between, and its entries read with this head's list of packs would send
            # chunks to the wrong packs (found by prune running beside two backups).
            with path.open("rb") as fh:
                magic, head_len, offset = _CACHE_PREFIX.unpack(fh.read(_CACHE_PREFIX.size))
                meta = json.loads(fh.read(head_len))
                count = meta["entries"]
                if magic != _CACHE_MAGIC or meta.get("version") != _CACHE_VERSION:
                    return None
                arr: Array = np.zeros(0, dtype=INDEX_ENTRY)
                if count:  # still mapped, but a plain ndarray: np.memmap's __getitem__ is slow
                    mapped = np.memmap(fh, INDEX_ENTRY, mode="r", offset=offset, shape=(count,))
                    arr = mapped.view(np.ndarray)
            if len(arr) and int(arr["pack"].max()) >= len(meta["packs"]):
                return None
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None
        index = cls()
        for name in meta["packs"]:
            index.pack_number(name)
        if len(arr):
            index._runs.append(arr)
            index._reindex()
        return index, set(meta["index_objects"])


def encode_index_object(packs: list[tuple[str, Array]]) -> bytes:
    """Plaintext of an index object listing ``(pack name, HEADER_ENTRY array)`` pairs."""
    parts = [F.INDEX_PREFIX_STRUCT.pack(F.INDEX_MAGIC, F.INDEX_VERSION, len(packs))]
    total = sum(len(h) for _, h in packs)
    entries = np.zeros(total, dtype=INDEX_ENTRY)
    pos = 0
    for number, (name, header) in enumerate(packs):
        parts.append(bytes.fromhex(name.rsplit("/", 1)[-1]))
        part = entries[pos : pos + len(header)]
        for field in HEADER_ENTRY.names or ():
            part[field] = header[field]
        part["pack"] = number
        pos += len(header)
    parts.append(F.COUNT.pack(total))
    parts.append(entries.tobytes())
    return b"".join(parts)


def decode_index_object(name: str, plain: bytes) -> tuple[list[str], Array]:
    """Pack names and INDEX_ENTRY array (``pack`` numbers the returned names)."""
    try:
        magic, version, npacks = F.INDEX_PREFIX_STRUCT.unpack_from(plain)
        if magic != F.INDEX_MAGIC:
            raise ValueError(f"bad magic {magic!r}")
        if version > F.INDEX_VERSION:
            raise UnsupportedFormatError(f"reading index object {name} - version {version}")
        pos = F.INDEX_PREFIX_STRUCT.size
        packs = [plain[pos + 32 * i : pos + 32 * (i + 1)].hex() for i in range(npacks)]
        pos += 32 * npacks
        (count,) = F.COUNT.unpack_from(plain, pos)
        pos += F.COUNT.size
        if len(plain) - pos != count * INDEX_ENTRY.itemsize:
            raise ValueError(f"{count} entries do not fit")
        entries = np.frombuffer(plain, dtype=INDEX_ENTRY, offset=pos).copy()
        if count and int(entries["pack"].max()) >= npacks:
            raise ValueError("entry names a pack outside the table")
    except (ValueError, IndexError, struct.error) as exc:
        raise IntegrityError(f"reading index object {name} - malformed: {exc}") from exc
    return [pack_name(h) for h in packs], entries
