"""The parent snapshot's directory listings, looked up by path while walking.

Listings stay in their JSON form: the backup compares a folder's new listing with
the old one as plain dicts and, when nothing changed, reuses the old tree id
without encoding, hashing or storing anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from stratavault.errors import DataDamagedError
from stratavault.repo import Repository
from stratavault.snapshot import ContentRun, NodeType, TreeDocs, content_runs, load_tree_docs
from stratavault.types import ChunkId

__all__ = ["ParentListing", "ParentTrees"]


@dataclass(slots=True)
class ParentListing:
    """One folder of the parent snapshot: its tree id (read from the repository, so
    stored) and entries (JSON form)."""

    tree: ChunkId | None = None
    docs: TreeDocs = field(default_factory=list)
    by_name: dict[str, dict[str, Any]] = field(default_factory=dict)
    content: dict[str, list[ContentRun]] = field(default_factory=dict)
    """The content runs of the complete files whose chunks are all stored, by name:
    what an unchanged file may reuse."""


_EMPTY = ParentListing()


class ParentTrees:
    """Listings of the parent snapshot by directory path, loaded on demand.

    The walk is depth-first, so only the listings along the current path and of
    folders whose trees are not written yet are kept; ``forget`` drops one once its
    folder's tree is written. Folders the listing cache knows are never loaded. A
    listing that cannot be read counts as absent: its files are simply read again.
    """

    def __init__(self, repo: Repository, root: ChunkId | None) -> None:
        self._repo = repo
        self._root = root
        self._cache: dict[str, ParentListing] = {}

    def listing(self, directory: str) -> ParentListing:
        """The parent snapshot's listing of ``directory`` (absolute, normalized)."""
        found = self._cache.get(directory)
        if found is not None:
            return found
        if directory == "/":
            found = self._load(self._root)
        else:
            parent, name = os.path.split(directory)
            doc = self.listing(parent).by_name.get(name)
            sub = doc.get("subtree") if doc and doc.get("type") == NodeType.DIR else None
            found = self._load(ChunkId(bytes.fromhex(sub)) if isinstance(sub, str) else None)
        self._cache[directory] = found
        return found

    def forget(self, directory: str) -> None:
        """Drop a listing that is no longer needed."""
        self._cache.pop(directory, None)

    def _load(self, tree_id: ChunkId | None) -> ParentListing:
        if tree_id is None:
            return _EMPTY
        try:
            docs = load_tree_docs(self._repo, tree_id)
        except (DataDamagedError, ValueError):
            return _EMPTY
        by_name = {d["name"]: d for d in docs if "name" in d}
        return ParentListing(tree_id, docs, by_name, self._reusable(by_name))

    def _reusable(self, by_name: dict[str, dict[str, Any]]) -> dict[str, list[ContentRun]]:
        """Content of the folder's complete files, checked against the index at once."""
        content: dict[str, list[ContentRun]] = {}
        for name, doc in by_name.items():
            if doc.get("type") == NodeType.FILE and "error" not in doc:
                try:
                    content[name] = content_runs(doc)
                except (KeyError, TypeError, ValueError):
                    continue
        ids = [cid for runs in content.values() for cid, _ in runs if cid is not None]
        missing = self._repo.missing_chunks(ids) if ids else set()
        if missing:
            content = {
                name: runs
                for name, runs in content.items()
                if not any(cid in missing for cid, _ in runs)
            }
        return content
