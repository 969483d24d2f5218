"""The parent snapshot's directory listings, looked up by path while walking."""

from __future__ import annotations

import os

from stratavault.repo import Repository
from stratavault.snapshot import Node, NodeType, load_tree
from stratavault.types import ChunkId

__all__ = ["ParentTrees"]


class ParentTrees:
    """Listings of the parent snapshot by directory path, loaded on demand.

    The walk is depth-first, so only the listings along the current path are
    kept; ``forget`` drops one when the walk leaves that directory.
    """

    def __init__(self, repo: Repository, root: ChunkId | None) -> None:
        self._repo = repo
        self._root = root
        self._cache: dict[str, dict[str, Node]] = {}

    def children(self, directory: str) -> dict[str, Node]:
        """The parent snapshot's entries of ``directory`` (absolute, normalized), by name."""
        found = self._cache.get(directory)
        if found is not None:
            return found
        if self._root is None:
            found = {}
        elif directory == "/":
            found = self._load(self._root)
        else:
            parent, name = os.path.split(directory)
            node = self.children(parent).get(name)
            ok = node is not None and node.type == NodeType.DIR and node.subtree is not None
            found = self._load(node.subtree) if ok and node and node.subtree else {}
        self._cache[directory] = found
        return found

    def lookup(self, directory: str, name: str) -> Node | None:
        """The parent snapshot's node for ``directory/name``, if any."""
        return self.children(directory).get(name)

    def forget(self, directory: str) -> None:
        """Drop a listing that is no longer needed."""
        self._cache.pop(directory, None)

    def _load(self, tree_id: ChunkId) -> dict[str, Node]:
        return {n.name: n for n in load_tree(self._repo, tree_id)}
