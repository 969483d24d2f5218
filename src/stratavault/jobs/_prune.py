"""Use case: prune, the garbage collection of data no snapshot references.

Mark (every chunk the snapshots reference), plan (packs to delete and to repack), then
sweep in two steps that keep backups running beside it safe: the planned packs leave the
index first and are deleted only once no backup that could still use them is running
(the rule is in docs/format.md, "Garbage collection"). Deletions that must wait are
finished by the next prune (or by this one with ``wait_s``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stratavault.errors import DataDamagedError
from stratavault.jobs._progress import Cancellation
from stratavault.repo import GcPlan, GcResult, LockInfo, PendingDeletion, Repository
from stratavault.snapshot import Snapshot, disk_chunk_ids, load_snapshots, load_tree
from stratavault.types import ChunkId

__all__ = ["PruneResult", "live_chunk_ids", "prune"]

Ids = npt.NDArray[np.bytes_]
_COMPACT_BYTES = 64 << 20
"""Collected ids are deduplicated whenever this many bytes of them pile up."""


@dataclass(slots=True)
class PruneResult:
    """What prune found and did."""

    plan: GcPlan | None = None
    dry_run: bool = False
    finished: list[GcResult] = field(default_factory=list)
    """Deletions carried out (earlier prunes' and this one's)."""
    postponed: list[tuple[PendingDeletion, list[LockInfo]]] = field(default_factory=list)
    """Deletions that wait for these locks (running backups) to go."""
    damaged_plans: list[str] = field(default_factory=list)
    retention_extended: int = 0
    """Objects whose object lock retention was extended (immutable repositories)."""

    @property
    def deleted_packs(self) -> int:
        """Packs deleted by this run."""
        return sum(r.deleted_packs for r in self.finished)

    @property
    def deleted_bytes(self) -> int:
        """Bytes deleted by this run."""
        return sum(r.deleted_bytes for r in self.finished)

    @property
    def locked_packs(self) -> list[tuple[str, dt.datetime | None]]:
        """Packs the backend refused to delete yet (object lock) with their retention date
        (None when unknown); a prune after that date deletes them."""
        return [item for r in self.finished for item in r.locked]


class _IdCollector:
    """Chunk ids gathered in bytes buffers, deduplicated now and then (bounded memory)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done: Ids = np.zeros(0, dtype="S32")

    def add(self, chunk_id: bytes) -> None:
        self._buf += chunk_id
        if len(self._buf) >= _COMPACT_BYTES:
            self._compact()

    def _compact(self) -> None:
        fresh = np.frombuffer(bytes(self._buf), dtype="S32")
        self._done = np.union1d(self._done, fresh)
        self._buf = bytearray()

    def result(self) -> Ids:
        self._compact()
        return self._done


def live_chunk_ids(
    repo: Repository, snapshots: Iterable[Snapshot], cancel: Cancellation | None = None
) -> Ids:
    """Sorted unique ids of every chunk the snapshots reference (trees and disk indexes
    included).

    Raises DataDamagedError when a tree cannot be read: what it references is unknown, so
    nothing may be collected (run ``check`` and ``repair snapshots``).
    """
    cancel = cancel or Cancellation()
    ids = _IdCollector()
    seen: set[ChunkId] = set()
    stack: list[ChunkId] = []
    for snap in snapshots:
        if snap.tree is not None:
            stack.append(snap.tree)
        for cid in disk_chunk_ids(repo, snap.disks):
            ids.add(cid)
    while stack:
        tree = stack.pop()
        if tree in seen:
            continue
        cancel.check()
        seen.add(tree)
        ids.add(tree)
        for node in load_tree(repo, tree):
            if node.subtree is not None:
                stack.append(node.subtree)
            for content_id, _n in node.content:
                if content_id is not None:
                    ids.add(content_id)
    return ids.result()


def _wait_for(repo: Repository, plan: PendingDeletion, own: str, wait_s: float) -> list[LockInfo]:
    """The locks blocking ``plan``, after waiting up to ``wait_s`` for them to go."""
    deadline = time.monotonic() + wait_s
    while True:
        locks = repo.gc.blocked_by(plan, own)
        if not locks or time.monotonic() >= deadline:
            return locks
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _carry_out(
    repo: Repository, plan: PendingDeletion, own: str, wait_s: float, result: PruneResult
) -> None:
    """Finish ``plan`` if no lock blocks it, else write down what it waits for."""
    locks = _wait_for(repo, plan, own, wait_s)  # locks first, then snapshots: see _gc.py
    if locks:
        if plan.blocking_locks is None:
            repo.gc.record_blocking(plan, locks)
        result.postponed.append((plan, locks))
        return
    new = [s for s in load_snapshots(repo) if s.id not in plan.snapshots]
    repo.refresh_index()  # backups that wrote those snapshots indexed their packs first
    result.finished.append(repo.gc.finish(plan, live_chunk_ids(repo, new)))


def prune(
    repo: Repository,
    *,
    max_unused: float = 0.05,
    dry_run: bool = False,
    wait_s: float = 0.0,
    cancel: Cancellation | None = None,
) -> PruneResult:
    """Collect garbage: finish earlier pending deletions, then mark, plan and sweep.

    ``max_unused``: tolerated fraction of unused bytes in packs that stay (0 repacks every
    pack with unused space). ``wait_s``: how long to wait for running backups before a
    deletion is left to the next prune. Raises DataDamagedError, before deleting anything,
    when some snapshot references data the repository does not have.
    """
    result = PruneResult(dry_run=dry_run)
    if dry_run:
        with repo.lock(exclusive=False):
            result.postponed = [(p, []) for p in repo.gc.pending()[0]]
            snapshots = load_snapshots(repo)
            repo.refresh_index()
            result.plan = _plan(repo, snapshots, max_unused, cancel)
        return result
    with repo.prune_lock() as own:
        plans, result.damaged_plans = repo.gc.pending()
        for name in result.damaged_plans:
            repo.gc.drop_plan(name)
        for plan in plans:
            _carry_out(repo, plan, own, wait_s, result)
        snapshots = load_snapshots(repo)
        repo.refresh_index()  # knows every chunk of the snapshots just listed
        result.plan = _plan(repo, snapshots, max_unused, cancel)
        if result.plan.delete or result.plan.repack:
            pending = repo.gc.start(result.plan, [s.id for s in snapshots])
            _carry_out(repo, pending, own, wait_s, result)
        result.retention_extended = repo.extend_retention(repo.indexed_packs())
    return result


def _plan(
    repo: Repository, snapshots: list[Snapshot], max_unused: float, cancel: Cancellation | None
) -> GcPlan:
    plan = repo.gc.plan(live_chunk_ids(repo, snapshots, cancel), max_unused=max_unused)
    if plan.lost_chunks:
        raise DataDamagedError(
            f"prune of {repo.storage.properties.location} - {plan.lost_chunks} chunk(s) that "
            f"snapshots reference are in no pack (e.g. {', '.join(plan.lost_examples)}); "
            "nothing was deleted: run `check`, then `repair index` or `repair snapshots`"
        )
    return plan
