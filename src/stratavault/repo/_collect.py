"""Carrying out a prune on a repository: copy, plan object, index rewrite, deletion.

The repository's public methods (``gc_*``) call these; the safety rule is explained in
``_gc.py`` and docs/format.md.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stratavault.errors import ObjectLockedError, ObjectNotFoundError
from stratavault.repo import _formats as F, _indexing
from stratavault.repo._gc import GcPlan, Ids, PendingDeletion, compute_plan, read_plans, write_plan
from stratavault.repo._index import ChunkIndex, Entry
from stratavault.repo._locks import LockInfo
from stratavault.repo._reading import read_pack_header, read_pack_sealed
from stratavault.types import BlobKind, ChunkId

if TYPE_CHECKING:
    from stratavault.repo._repository import Repository

__all__ = ["GarbageCollector", "GcResult"]


@dataclass(frozen=True, slots=True)
class GcResult:
    """What finishing a pending deletion did."""

    deleted_packs: int
    deleted_bytes: int
    restored_packs: tuple[str, ...]
    """Packs put back into the index because snapshots written since the mark need them."""
    still_missing: int
    """Chunks those snapshots need that no pack holds (reported as damage)."""
    locked: tuple[tuple[str, dt.datetime | None], ...] = ()
    """Packs the backend refused to delete yet (object lock), each with its retention
    date; the plan object keeps naming them, so a later prune deletes them."""


REFRAME_LEVEL = 3
"""zstd level of frames whose live members prune compresses again (the disk default)."""


def _copy_live_chunks(repo: Repository, names: list[str], copy: Any) -> None:
    """Write the live chunks of the packs to repack into new packs (verified on the way).
    ``copy`` holds index records whose ``pack`` numbers ``names``."""
    by_pack: dict[str, list[tuple[bytes, Entry]]] = defaultdict(list)
    for rec in copy:
        entry = Entry(-1, int(rec["kind"]), int(rec["offset"]), int(rec["stored"]), int(rec["raw"]))
        by_pack[names[int(rec["pack"])]].append((bytes(rec["id"]).ljust(32, b"\0"), entry))
    for pack, entries in sorted(by_pack.items()):
        for members, blob, frame in read_pack_sealed(repo.storage, repo._keys, pack, entries):
            kind = BlobKind(members[0][1].kind & ~F.KIND_FRAMED)
            if frame is None:
                for cid, entry in members:
                    repo.add_sealed(ChunkId(cid), blob, entry.raw, kind)
            elif len(members) == len(frame.spans):  # every member lives: the frame moves
                repo.add_sealed_frame([(ChunkId(c), e.raw) for c, e in members], blob, kind)
            else:  # the live members are compressed again, together, without the others
                live = [(ChunkId(c), memoryview(frame.member(c))) for c, _ in members]
                repo.add_chunks(live, kind, level=REFRAME_LEVEL)
    repo.flush()


def start(repo: Repository, plan: GcPlan, snapshots: list[str]) -> PendingDeletion:
    """Copy the live chunks of repacked packs, write the plan object, then rewrite the index
    without the planned packs. Returns the plan (its ``blocking_locks`` still unknown)."""
    repo.flush()
    removed = set(plan.delete) | set(plan.repack) | set(plan.missing_packs)
    with repo._lock:  # in memory only: the backend's index still has them if we stop here
        names = list(repo._index.packs)
        repo._index = repo._index.without_packs(removed)
    _copy_live_chunks(repo, names, plan.copy)
    packs = sorted(set(plan.delete) | set(plan.repack))
    now = repo._clock()
    name = write_plan(repo.storage, repo._keys, packs, snapshots, None, now)
    rewrite_index(repo)
    return PendingDeletion(name, tuple(packs), frozenset(snapshots), None, now)


def rewrite_index(repo: Repository) -> None:
    """Write index objects covering exactly the in-memory index, then delete the ones this
    process had read or written before (objects other processes wrote meanwhile stay)."""
    with repo._lock:
        old = set(repo._index_objects)
        repo._index_objects = set()
        batches = repo._index.by_pack()
    step = repo._opt.index_every_packs
    for start_at in range(0, len(batches), step):
        repo._write_index(batches[start_at : start_at + step])
    with repo._lock:
        stale = old - repo._index_objects
    for name in sorted(stale):
        with suppress(ObjectNotFoundError):
            repo.storage.delete(name)
    repo._save_cache()


def pending(repo: Repository) -> tuple[list[PendingDeletion], list[str]]:
    """Plan objects on the backend, and the names of damaged ones."""
    plans: list[PendingDeletion] = []
    damaged: list[str] = []
    for found in read_plans(repo.storage, repo._keys):
        if isinstance(found, str):
            damaged.append(found)
        else:
            plans.append(found)
    return sorted(plans, key=lambda p: p.time), damaged


def blocked_by(repo: Repository, plan: PendingDeletion, own_lock: str) -> list[LockInfo]:
    """Locks that keep ``plan``'s packs from being deleted now (see the module docstring)."""
    held = repo._locker.live(own=own_lock)
    if plan.blocking_locks is None:
        return held
    return [lock for lock in held if lock.name in plan.blocking_locks]


def record_blocking(repo: Repository, plan: PendingDeletion, locks: list[LockInfo]) -> str:
    """Rewrite ``plan`` with the locks that block it; return the new plan object's name."""
    name = write_plan(
        repo.storage, repo._keys, list(plan.packs), sorted(plan.snapshots),
        [lock.name for lock in locks], plan.time,
    )  # fmt: skip
    if name != plan.name:
        repo.storage.delete(plan.name)
    return name


def finish(repo: Repository, plan: PendingDeletion, new_live: Ids) -> GcResult:
    """Delete ``plan``'s packs, first putting back into the index any pack holding a chunk
    in ``new_live`` (chunks of snapshots written since the mark) that the index lacks.
    Call only when :func:`blocked_by` is empty and with locks listed before snapshots."""
    repo._sync_index()
    sizes = {obj.name: obj.size_bytes for obj in repo.storage.list(F.DATA_PREFIX)}
    with repo._lock:
        indexed = set(repo._index.packs)
        known = repo._index.merged()["id"]
    candidates = [p for p in plan.packs if p in sizes and p not in indexed]
    needed = new_live[~np.isin(new_live, known)] if len(new_live) else new_live
    restored: list[tuple[str, Any]] = []
    for pack in candidates if len(needed) else []:
        header = read_pack_header(repo.storage, repo._keys, pack, sizes[pack])
        if header is not None and np.isin(header["id"], needed).any():
            restored.append((pack, header))
            needed = needed[~np.isin(needed, header["id"])]
    if restored:
        _indexing.index_packs(repo, restored)
        repo._save_cache()
    keep = {name for name, _ in restored}
    deleted = deleted_bytes = 0
    locked: dict[str, dt.datetime | None] = {}
    for pack in candidates:
        if pack in keep:
            continue
        try:
            repo.storage.delete(pack)
        except ObjectNotFoundError:
            continue
        except ObjectLockedError as exc:  # kept; the plan still names it: retried later
            locked[pack] = exc.retain_until
            continue
        deleted += 1
        deleted_bytes += sizes[pack]
    if not locked:
        drop_plan(repo, plan.name)
    found = tuple(sorted(locked.items()))
    return GcResult(deleted, deleted_bytes, tuple(sorted(keep)), len(needed), found)


def pending_index(repo: Repository) -> ChunkIndex:
    """The chunks of packs a prune took out of the index but has not deleted yet.

    A backup that ran beside that prune may have used them (its snapshot is complete: the
    next prune puts such packs back into the index). Reading falls back to them;
    deduplication never does.
    """
    planned = planned_packs(repo)
    sizes = {o.name: o.size_bytes for o in repo.storage.list(F.DATA_PREFIX) if o.name in planned}
    pending = ChunkIndex()
    for name, size in sorted(sizes.items()):
        header = read_pack_header(repo.storage, repo._keys, name, size)
        if header is not None:
            pending.add_pack(name, header)
    return pending


def planned_packs(repo: Repository) -> set[str]:
    """Every pack some readable plan object names (never re-indexed by a backup)."""
    plans, _damaged = pending(repo)
    return {pack for plan in plans for pack in plan.packs}


def drop_plan(repo: Repository, name: str) -> None:
    """Remove a (damaged) plan object; its packs are indexed again by the next backup."""
    with suppress(ObjectNotFoundError):
        repo.storage.delete(name)


class GarbageCollector:
    """Prune's operations on one repository (``repo.gc``); the rule is in ``_gc.py``."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo

    def plan(self, live: Ids, *, max_unused: float) -> GcPlan:
        """What a prune would delete and repack, given the sorted unique ids of every live
        chunk."""
        repo = self._repo
        repo.flush()
        sizes = {obj.name: obj.size_bytes for obj in repo.storage.list(F.DATA_PREFIX)}
        with repo._lock:
            return compute_plan(repo._index, sizes, live, max_unused=max_unused)

    def start(self, plan: GcPlan, snapshots: list[str]) -> PendingDeletion:
        """Repack, write the plan object, rewrite the index without the planned packs."""
        return start(self._repo, plan, snapshots)

    def pending(self) -> tuple[list[PendingDeletion], list[str]]:
        """Pending deletions on the backend (oldest first) and names of damaged plan objects."""
        return pending(self._repo)

    def blocked_by(self, plan: PendingDeletion, own_lock: str) -> list[LockInfo]:
        """Locks that keep ``plan`` from being carried out now."""
        return blocked_by(self._repo, plan, own_lock)

    def record_blocking(self, plan: PendingDeletion, locks: list[LockInfo]) -> str:
        """Write down which locks block ``plan``; return the plan object's new name."""
        return record_blocking(self._repo, plan, locks)

    def finish(self, plan: PendingDeletion, new_live: Ids) -> GcResult:
        """Delete ``plan``'s packs, keeping those that chunks in ``new_live`` need."""
        return finish(self._repo, plan, new_live)

    def drop_plan(self, name: str) -> None:
        """Remove a (damaged) plan object; its packs are indexed again by the next backup."""
        drop_plan(self._repo, name)
