"""Use cases that read snapshots: list entries, compare two snapshots, sizes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from stratavault.repo import Repository
from stratavault.snapshot import Node, NodeType, Snapshot, load_tree, resolve_path, walk_tree
from stratavault.types import ChunkId

__all__ = [
    "DiffEntry",
    "SnapshotSize",
    "diff_snapshots",
    "list_entries",
    "snapshot_size",
    "split_snapshot_ref",
]


def list_entries(
    repo: Repository, snapshot: Snapshot, path: str = "/", *, recursive: bool = True
) -> Iterator[tuple[str, Node]]:
    """Yield ``(path, node)`` below ``path`` of a snapshot (the entry itself first)."""
    where, node = resolve_path(repo, snapshot, path)
    base = "" if where == "/" else where
    if node is not None:
        yield where, node
        if node.type != NodeType.DIR or node.subtree is None:
            return
    tree = snapshot.tree if node is None else node.subtree
    assert tree is not None
    if recursive:
        yield from walk_tree(repo, tree, base)
    else:
        for child in load_tree(repo, tree):
            yield f"{base}/{child.name}", child


@dataclass(frozen=True, slots=True)
class DiffEntry:
    """One difference: ``+`` added, ``-`` removed, ``M`` content changed, ``U`` metadata only."""

    change: str
    path: str
    node: Node


def _children(repo: Repository, tree: ChunkId | None) -> dict[str, Node]:
    return {n.name: n for n in load_tree(repo, tree)} if tree else {}


def _all(repo: Repository, change: str, path: str, node: Node) -> Iterator[DiffEntry]:
    yield DiffEntry(change, path, node)
    if node.type == NodeType.DIR and node.subtree:
        for sub_path, sub in walk_tree(repo, node.subtree, path):
            yield DiffEntry(change, sub_path, sub)


def _compare(
    repo: Repository, a: ChunkId | None, b: ChunkId | None, base: str
) -> Iterator[DiffEntry]:
    if a == b:
        return  # identical subtrees: nothing below differs
    old, new = _children(repo, a), _children(repo, b)
    for name in sorted(old.keys() | new.keys()):
        path, x, y = f"{base}/{name}", old.get(name), new.get(name)
        if y is None and x is not None:
            yield from _all(repo, "-", path, x)
        elif x is None and y is not None:
            yield from _all(repo, "+", path, y)
        elif x is not None and y is not None:
            if x.type != y.type:
                yield from _all(repo, "-", path, x)
                yield from _all(repo, "+", path, y)
                continue
            if x.type == NodeType.FILE and x.content != y.content:
                yield DiffEntry("M", path, y)
            elif x.type != NodeType.DIR and _metadata(x) != _metadata(y):
                yield DiffEntry("U", path, y)
            if x.type == NodeType.DIR:
                yield from _compare(repo, x.subtree, y.subtree, path)


def _metadata(node: Node) -> dict[str, object]:
    """What counts as a metadata change (access times do not)."""
    doc = node.to_json()
    doc.pop("atime_ns", None)
    return doc


def diff_snapshots(repo: Repository, first: Snapshot, second: Snapshot) -> Iterator[DiffEntry]:
    """Yield what changed from ``first`` to ``second``, skipping identical subtrees."""
    yield from _compare(repo, first.tree, second.tree, "")


@dataclass(slots=True)
class SnapshotSize:
    """What restoring a snapshot would produce."""

    files: int = 0
    dirs: int = 0
    others: int = 0
    restore_bytes: int = 0
    unique_chunks: int = 0
    unique_chunk_bytes: int = 0


def snapshot_size(repo: Repository, snapshot: Snapshot) -> SnapshotSize:
    """Count files and bytes of a snapshot, and its distinct chunks."""
    size, seen = SnapshotSize(), set()
    if snapshot.tree is None:  # a snapshot of disks: see disk_usage
        return size
    for _path, node in walk_tree(repo, snapshot.tree):
        if node.type == NodeType.FILE:
            size.files += 1
            size.restore_bytes += node.size
            for cid, n in node.content:
                if cid is not None and cid not in seen:
                    seen.add(cid)
                    size.unique_chunks += 1
                    size.unique_chunk_bytes += n
        elif node.type == NodeType.DIR:
            size.dirs += 1
        else:
            size.others += 1
    return size


def split_snapshot_ref(ref: str) -> tuple[str, str]:
    """Split ``SNAPSHOT[:PATH]`` into the snapshot reference and the path (default ``/``)."""
    name, _, path = ref.partition(":")
    return name, ("/" + path.lstrip("/")) if path else "/"
