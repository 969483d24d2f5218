"""Garbage collection (prune): what to delete or repack, and the deletions that wait.

Why concurrent backups stay safe (the rule is written down in docs/format.md, "Garbage
collection"): prune never deletes a pack in the same step that takes it out of the index.

1. Under a ``prune`` lock (backups keep running) the caller marks: it hands over the id of
   every chunk that the snapshots listed at the start reference.
2. The packs without a live chunk, and the packs to repack (their live chunks are first
   copied into new packs), are named in a *plan* object ``gc/<hash>`` before they leave the
   index. Backups never re-index a pack a plan names.
3. The index is rewritten without them. Backups read the index only after taking their lock,
   so a backup that starts from now on cannot deduplicate against those packs.
4. A planned pack is deleted only when no lock that was held when the index was rewritten is
   still held (such a backup may have deduplicated against it), and only after the packs
   holding chunks that snapshots written since the mark need were put back into the index.
   Otherwise the deletion waits for the next prune.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from stratavault.errors import DataDamagedError, ObjectNotFoundError
from stratavault.repo import _formats as F
from stratavault.repo._crypto import MasterKeys, compress, content_hash
from stratavault.repo._index import ChunkIndex
from stratavault.repo._reading import open_document
from stratavault.storage import Storage

__all__ = ["GcPlan", "PendingDeletion", "compute_plan", "read_plans", "write_plan"]

Ids = npt.NDArray[np.bytes_]


@dataclass(frozen=True, slots=True)
class GcPlan:
    """What a prune would do, computed from the index, the pack sizes and the live chunks."""

    packs: int
    pack_bytes: int
    live_chunks: int
    live_bytes: int
    """Stored bytes of the live chunks, each counted once."""
    unused_bytes: int
    """Stored bytes of the chunks no snapshot references (and of second copies)."""
    delete: tuple[str, ...]
    """Packs without a live chunk."""
    repack: tuple[str, ...]
    """Packs whose live chunks are copied into new packs before they go."""
    copy_chunks: int
    copy_bytes: int
    missing_packs: tuple[str, ...]
    """Packs the index names that are not on the backend (their entries are dropped)."""
    lost_chunks: int
    """Live chunks found in no existing pack (the repository is damaged: prune refuses)."""
    lost_examples: tuple[str, ...]
    unindexed_packs: int
    """Packs on the backend that no index object names (a running or crashed backup's)."""
    copy: Any = field(default=None, repr=False, compare=False)
    """INDEX_ENTRY records of the chunks to copy (``pack`` numbers the client index)."""

    @property
    def freed_bytes(self) -> int:
        """Bytes the backend gets back once the planned packs are deleted (estimate)."""
        return self.removed_bytes - self.copy_bytes

    removed_bytes: int = 0
    """Bytes of the packs to delete and to repack."""


@dataclass(frozen=True, slots=True)
class PendingDeletion:
    """A plan object on the backend: packs out of the index, waiting to be deleted."""

    name: str
    packs: tuple[str, ...]
    snapshots: frozenset[str]
    """The snapshots the mark saw; chunks of later ones may still need these packs."""
    blocking_locks: tuple[str, ...] | None
    """Locks held when the index was rewritten; None when not known (prune was stopped
    before it wrote them down): then every lock held now blocks."""
    time: float


def _home_entries(arr: Any, live: Ids, present: npt.NDArray[np.bool_]) -> Any:
    """Indexes into ``arr`` of one entry per live chunk, in an existing pack, newest pack first."""
    idx = np.flatnonzero(np.isin(arr["id"], live) & present[arr["pack"]])
    if not len(idx):
        return idx
    idx = idx[np.argsort(-arr["pack"][idx].astype(np.int64), kind="stable")]
    idx = idx[np.argsort(arr["id"][idx], kind="stable")]
    ids = arr["id"][idx]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return idx[first]


def _blobs(entries: Any) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Entries sharing a pack and offset are one blob (a frame's members): the index of each
    blob's first entry, and each entry's blob number."""
    where = entries["pack"].astype(np.uint64) << np.uint64(32) | entries["offset"]
    _, first, inverse = np.unique(where, return_index=True, return_inverse=True)
    return first, inverse


def _bytes_per_pack(entries: Any, npk: int) -> npt.NDArray[np.int64]:
    """Stored bytes of the distinct blobs of ``entries`` per pack number (a frame counts
    once, not once per member)."""
    if not len(entries):
        return np.zeros(npk, dtype=np.int64)
    first, _ = _blobs(entries)
    weights = entries["stored"][first]
    return np.bincount(entries["pack"][first], weights=weights, minlength=npk).astype(np.int64)


def _live_bytes_per_pack(arr: Any, home: Any, npk: int) -> npt.NDArray[np.int64]:
    """Stored bytes per pack that the ``home`` entries of ``arr`` use: a frame's bytes in
    the share of its live members' raw bytes (repacking recompresses the live ones)."""
    if not len(home):
        return np.zeros(npk, dtype=np.int64)
    first, inverse = _blobs(arr)
    blob_raw = np.bincount(inverse, weights=arr["raw"], minlength=len(first))
    raw = arr["raw"][home].astype(np.float64)
    share = np.divide(raw, blob_raw[inverse[home]], out=np.ones_like(raw), where=raw > 0)
    weights = arr["stored"][home] * np.minimum(share, 1.0)
    live = np.bincount(arr["pack"][home], weights=weights, minlength=npk)
    return np.ceil(live).astype(np.int64)  # a pack with a live chunk never counts 0


def _choose_repacks(
    names: list[str], sizes: npt.NDArray[np.int64], live: npt.NDArray[np.int64],
    candidates: npt.NDArray[np.bool_], max_unused: float,
) -> list[int]:  # fmt: skip
    """Packs to repack, emptiest first, until unused bytes are at most ``max_unused`` of all.
    ``sizes``: stored bytes of all blobs per pack (headers do not count as unused)."""
    total = int(sizes[candidates].sum())
    unused = total - int(live[candidates].sum())
    chosen: list[int] = []
    order = sorted(
        (int(i) for i in np.flatnonzero(candidates) if sizes[i] > live[i]),
        key=lambda i: (int(live[i]) / max(int(sizes[i]), 1), names[i]),
    )
    for i in order:
        if unused <= max_unused * total:
            break
        chosen.append(i)
        unused -= int(sizes[i] - live[i])
        total -= int(sizes[i] - live[i])
    return chosen


def compute_plan(
    index: ChunkIndex, sizes: dict[str, int], live: Ids, *, max_unused: float
) -> GcPlan:
    """Plan a prune. ``live``: sorted unique ids of every chunk some snapshot references;
    ``sizes``: every pack on the backend and its size; ``max_unused``: fraction (0..1) of
    unused bytes tolerated before packs are repacked."""
    arr = index.merged()
    names = list(index.packs)
    present = np.array([n in sizes for n in names] or [False], dtype=bool)
    home = _home_entries(arr, live, present)
    npk = max(len(names), 1)
    live_bytes = _live_bytes_per_pack(arr, home, npk)
    blob_bytes = _bytes_per_pack(arr, npk)
    pack_sizes = np.array([sizes.get(n, 0) for n in names] or [0], dtype=np.int64)
    has_entries = np.zeros(npk, dtype=bool)
    has_entries[arr["pack"]] = True
    delete = present & has_entries & (live_bytes == 0)
    keep = present & ~delete
    repack = _choose_repacks(names, blob_bytes, live_bytes, keep, max_unused)
    repacked = np.zeros(npk, dtype=bool)
    repacked[repack] = True
    copy = arr[home[repacked[arr["pack"][home]]]] if len(home) else arr[:0]
    lost = live[~np.isin(live, arr["id"][home])] if len(live) else live
    removed = delete | repacked
    return GcPlan(
        packs=len(sizes),
        pack_bytes=sum(sizes.values()),
        live_chunks=len(home),
        live_bytes=int(live_bytes.sum()),
        unused_bytes=int((blob_bytes - live_bytes)[present].sum()),
        delete=tuple(names[i] for i in np.flatnonzero(delete)),
        repack=tuple(names[i] for i in repack),
        copy_chunks=len(copy),
        copy_bytes=int(_bytes_per_pack(copy, npk).sum()),
        missing_packs=tuple(n for n in names if n not in sizes),
        lost_chunks=len(lost),
        lost_examples=tuple(bytes(i).ljust(32, b"\0").hex() for i in lost[:5]),
        unindexed_packs=len(set(sizes) - set(names)),
        copy=copy,
        removed_bytes=int(pack_sizes[removed].sum()),
    )


def write_plan(
    storage: Storage, keys: MasterKeys, packs: list[str], snapshots: list[str],
    blocking_locks: list[str] | None, time: float,
) -> str:  # fmt: skip
    """Store a plan object; return its name."""
    doc = {
        "v": F.GC_PLAN_VERSION,
        "time": time,
        "packs": sorted(packs),
        "snapshots": sorted(snapshots),
        "blocking_locks": None if blocking_locks is None else sorted(blocking_locks),
    }
    stored = keys.seal(compress(json.dumps(doc).encode(), 3), F.AD_GC_PLAN)
    name = F.GC_PREFIX + content_hash(stored)
    storage.put(name, stored, overwrite=True)
    return name


def read_plans(storage: Storage, keys: MasterKeys) -> Iterator[PendingDeletion | str]:
    """Every plan object; the bare name of a damaged one (its packs are simply not deleted:
    the next backup puts them back into the index)."""
    for obj in storage.list(F.GC_PREFIX):
        try:
            doc = json.loads(open_document(storage, keys, obj.name, F.AD_GC_PLAN))
            locks = doc["blocking_locks"]
            yield PendingDeletion(
                name=obj.name,
                packs=tuple(str(p) for p in doc["packs"]),
                snapshots=frozenset(str(s) for s in doc["snapshots"]),
                blocking_locks=None if locks is None else tuple(str(n) for n in locks),
                time=float(doc["time"]),
            )
        except ObjectNotFoundError:
            continue
        except (DataDamagedError, ValueError, KeyError, TypeError):
            yield obj.name
