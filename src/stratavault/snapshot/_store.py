"""Reading and writing snapshots and trees through a repository."""

from __future__ import annotations

from collections.abc import Iterator

from stratavault.errors import DataDamagedError, SnapshotNotFoundError, UsageError
from stratavault.repo import Repository
from stratavault.snapshot._snapshot import Snapshot, latest, select_snapshots
from stratavault.snapshot._tree import (
    Node,
    NodeType,
    TreeDocs,
    decode_docs,
    decode_tree,
    encode_docs,
    encode_tree,
)
from stratavault.types import BlobKind, ChunkId

__all__ = [
    "find_snapshot",
    "load_snapshots",
    "load_tree",
    "load_tree_docs",
    "resolve_path",
    "save_snapshot",
    "save_tree",
    "save_tree_docs",
    "walk_tree",
]


def save_tree(repo: Repository, nodes: list[Node]) -> ChunkId:
    """Store a directory listing (once per distinct content) and return its id."""
    return _save_encoded(repo, encode_tree(nodes))


def save_tree_docs(repo: Repository, docs: TreeDocs) -> ChunkId:
    """Store a listing given in its canonical JSON form (see ``tree_docs``)."""
    return _save_encoded(repo, encode_docs(docs))


def _save_encoded(repo: Repository, data: bytes) -> ChunkId:
    tree_id = repo.chunk_id(data)
    if not repo.has_chunk(tree_id):
        repo.add_chunk(tree_id, data, BlobKind.TREE)
    return tree_id


def load_tree_docs(repo: Repository, tree_id: ChunkId) -> TreeDocs:
    """Read one directory listing in its JSON form (cheaper than nodes when comparing)."""
    return decode_docs(repo.read_chunk(tree_id), where=f"tree {tree_id.hex()[:16]}")


def load_tree(repo: Repository, tree_id: ChunkId) -> list[Node]:
    """Read and parse one directory listing."""
    return decode_tree(repo.read_chunk(tree_id), where=f"tree {tree_id.hex()[:16]}")


def save_snapshot(repo: Repository, snapshot: Snapshot) -> str:
    """Write the snapshot (after every pack and index it needs) and set its id."""
    snapshot.id = repo.save_snapshot(snapshot.to_document())
    return snapshot.id


def load_snapshots(
    repo: Repository, *, damaged: list[tuple[str, str]] | None = None
) -> list[Snapshot]:
    """Return every snapshot of the repository, oldest first.

    A damaged snapshot raises DataDamagedError; with ``damaged`` given, it is skipped and
    listed there as ``(id, message)`` (listing, restoring and backing up need not stop for
    it; prune must, as it cannot know what the snapshot references).
    """
    found = []
    for sid, doc in repo.list_snapshots(damaged):
        try:
            found.append(Snapshot.from_document(sid, doc))
        except DataDamagedError as exc:
            if damaged is None:
                raise
            damaged.append((sid, str(exc)))
    return sorted(found, key=lambda s: (s.time, s.id))


def find_snapshot(
    repo: Repository, ref: str, *, hosts: tuple[str, ...] = (), paths: tuple[str, ...] = ()
) -> Snapshot:
    """Resolve ``latest`` (optionally filtered) or a unique id prefix to a snapshot."""
    if ref == "latest":
        damaged: list[tuple[str, str]] = []
        usable = load_snapshots(repo, damaged=damaged)
        matching = select_snapshots(usable, hosts=hosts, paths=paths)
        if not matching and damaged:  # one of those may have been the one meant
            ids = ", ".join(sid[:12] for sid, _problem in damaged[:3])
            raise DataDamagedError(
                f"no readable snapshot matches 'latest'; {len(damaged)} snapshot objects "
                f"are damaged ({ids}{', ...' if len(damaged) > 3 else ''}): run `check`"
            )
        return latest(matching)
    if not ref or any(c not in "0123456789abcdef" for c in ref):
        raise UsageError(f"snapshot {ref!r}: expected 'latest' or a hex id prefix")
    sid = repo.resolve_snapshot_id(ref)
    return Snapshot.from_document(sid, repo.load_snapshot(sid))


def resolve_path(repo: Repository, snapshot: Snapshot, path: str) -> tuple[str, Node | None]:
    """Find the node at ``path`` (``/``-separated, absolute) in a snapshot.

    Returns the normalized path and the node (``None`` for the root).
    """
    parts = [p for p in path.split("/") if p and p != "."]
    node: Node | None = None
    tree_id: ChunkId | None = snapshot.tree
    for i, part in enumerate(parts):
        if tree_id is None:
            break
        match = [n for n in load_tree(repo, tree_id) if n.name == part]
        if not match:
            break
        node = match[0]
        tree_id = node.subtree if node.type == NodeType.DIR else None
        if i == len(parts) - 1:
            return "/" + "/".join(parts), node
    if not parts:
        return "/", None
    raise SnapshotNotFoundError(f"snapshot {snapshot.short_id}: no path {path!r}")


def walk_tree(repo: Repository, tree_id: ChunkId, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Yield ``(path, node)`` for every entry below a tree, parents before children."""
    for node in load_tree(repo, tree_id):
        path = f"{prefix}/{node.name}"
        yield path, node
        if node.type == NodeType.DIR and node.subtree is not None:
            yield from walk_tree(repo, node.subtree, path)
