"""Use case: rewrite damaged snapshots without their unreadable parts (``repair snapshots``).

``check --read-data`` finds the damage; only the packs it names are read again here, chunk
by chunk, to know exactly which chunks are lost. Each selected file snapshot's tree is then
rewritten (each distinct tree once):

- a folder whose listing cannot be read becomes an empty folder (its own metadata, which
  sits in the parent's listing, is kept);
- in a file, each damaged or missing chunk becomes a hole of the same length: the file
  keeps its size and its readable parts stay where they were (a restore writes zeros in
  place of the lost bytes, and ``--verify`` accepts them). The node's ``error`` says so.

The new snapshot is the original with the new tree, the tag ``repaired`` and a ``repair``
record naming the original and listing every change; the original is removed only with
``forget``. Runs under the exclusive lock (shared for a dry run, which writes nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from stratavault.errors import DataDamagedError, ObjectNotFoundError
from stratavault.jobs._check import check_repository
from stratavault.jobs._progress import Cancellation, Progress
from stratavault.repo import Repository
from stratavault.snapshot import (
    FileError,
    Node,
    NodeType,
    RepairRecord,
    Snapshot,
    encode_tree,
    find_snapshot,
    load_snapshots,
    load_tree,
    save_snapshot,
    save_tree,
)
from stratavault.types import ChunkId

__all__ = ["REPAIRED_TAG", "RepairSnapshotsResult", "SnapshotRepair", "repair_snapshots"]

REPAIRED_TAG = "repaired"
"""Tag added to every snapshot written by ``repair snapshots``."""

_UNREADABLE = (DataDamagedError, ObjectNotFoundError)
"""What reading a damaged chunk raises (a deleted pack is a missing object)."""


@dataclass(slots=True)
class SnapshotRepair:
    """One damaged snapshot: what was (or, in a dry run, would be) removed from it."""

    original: str
    removed: list[FileError]
    new_id: str | None = None
    """The repaired snapshot (None in a dry run)."""
    forgotten: bool = False


@dataclass(slots=True)
class RepairSnapshotsResult:
    """What the check found and what was repaired."""

    dry_run: bool
    snapshots_checked: int = 0
    damages: int = 0
    """Damaged objects reported by the check."""
    repaired: list[SnapshotRepair] = field(default_factory=list)


class _Rewriter:
    """Rewrites trees without their unreadable parts; remembers each tree's outcome."""

    def __init__(self, repo: Repository, damaged_packs: set[str], *, dry_run: bool) -> None:
        self.repo, self.damaged_packs, self.dry_run = repo, damaged_packs, dry_run
        self.readable: dict[ChunkId, bool] = {}
        self.done: dict[ChunkId, tuple[ChunkId, list[FileError]]] = {}
        """tree id -> (its rewritten id, changes with paths relative to the tree)."""

    def lost(self, cid: ChunkId) -> bool:
        """Whether a chunk is missing or, in a pack the check names, unreadable."""
        try:
            pack = self.repo.chunk_info(cid).pack  # also finds chunks of packs a prune plans
        except _UNREADABLE:
            return True
        if pack not in self.damaged_packs:
            return False
        if cid not in self.readable:
            try:
                self.repo.read_chunk(cid)
                self.readable[cid] = True
            except _UNREADABLE:
                self.readable[cid] = False
        return not self.readable[cid]

    def tree(self, tree_id: ChunkId, path: str) -> tuple[ChunkId, list[FileError]]:
        """The rewritten tree and every change below ``path`` (none: the same id)."""
        if tree_id not in self.done:
            self.done[tree_id] = self._rewrite(tree_id)
        new_id, changes = self.done[tree_id]
        return new_id, [FileError(f"{path}{c.path}" or "/", c.error) for c in changes]

    def _rewrite(self, tree_id: ChunkId) -> tuple[ChunkId, list[FileError]]:
        try:
            if self.lost(tree_id):
                raise DataDamagedError(f"tree {tree_id.hex()[:16]} is damaged or missing")
            nodes = load_tree(self.repo, tree_id)
        except _UNREADABLE as exc:
            what = f"folder listing unreadable ({exc}); replaced by an empty folder"
            return self.save([]), [FileError("", what)]
        changes: list[FileError] = []
        for node in nodes:
            sub = f"/{node.name}"
            if node.type == NodeType.DIR and node.subtree is not None:
                node.subtree, below = self.tree(node.subtree, sub)
                changes += below
            elif node.type == NodeType.FILE:
                lost = [n for cid, n in node.content if cid is not None and self.lost(cid)]
                if lost:
                    node.content = [
                        (None, n) if cid is not None and self.lost(cid) else (cid, n)
                        for cid, n in node.content
                    ]
                    what = f"{sum(lost)} bytes in {len(lost)} damaged chunk(s) replaced by zeros"
                    node.error = f"repair: {what}"
                    changes.append(FileError(sub, what))
        return (self.save(nodes) if changes else tree_id), changes

    def save(self, nodes: list[Node]) -> ChunkId:
        """Store a listing (a dry run only computes its id)."""
        if self.dry_run:
            return self.repo.chunk_id(encode_tree(nodes))
        return save_tree(self.repo, nodes)


def repair_snapshots(
    repo: Repository,
    *,
    snapshots: Sequence[str] = (),
    forget: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> RepairSnapshotsResult:
    """Write a repaired copy of every damaged file snapshot (or of those named by id
    prefix or ``latest``); with ``forget`` remove each original once its copy is saved.

    Raises ``DataDamagedError`` when index objects are damaged: ``repair index`` must run
    first, or chunks that are only unindexed would be taken for lost.
    """
    named = [find_snapshot(repo, ref) for ref in snapshots]
    found = check_repository(repo, read_data=True, progress=progress, cancel=cancel)
    if repo.damaged_index_names():
        raise DataDamagedError(
            "repair snapshots: index objects are damaged; run `stratavault repair index` first"
        )
    result = RepairSnapshotsResult(dry_run, found.snapshots, len(found.damages))
    if not found.damages:
        return result
    packs = {d.object.removeprefix("pack ") for d in found.damages if d.object.startswith("pack ")}
    rewriter = _Rewriter(repo, packs, dry_run=dry_run)
    with repo.lock(exclusive=not dry_run):
        selected = named or load_snapshots(repo, damaged=[])  # unreadable ones: forget them
        for snap in selected:
            if snap.tree is None:
                continue  # disk snapshots: not repaired here
            new_tree, removed = rewriter.tree(snap.tree, "")
            if not removed:
                continue
            record = SnapshotRepair(snap.id, removed)
            if not dry_run:
                record.new_id = save_snapshot(repo, _repaired_copy(snap, new_tree, removed))
                if forget:
                    repo.remove_snapshot(snap.id)
                    record.forgotten = True
            result.repaired.append(record)
    return result


def _repaired_copy(snap: Snapshot, tree: ChunkId, removed: list[FileError]) -> Snapshot:
    tags = snap.tags if REPAIRED_TAG in snap.tags else [*snap.tags, REPAIRED_TAG]
    record = RepairRecord(snap.id, removed)
    return dataclasses.replace(snap, id="", tree=tree, tags=tags, repair=record)
