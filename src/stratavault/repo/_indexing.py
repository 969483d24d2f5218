"""Index maintenance of a repository: checking, rebuilding and recovering index objects.

The repository's public methods call these (they work on its private state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stratavault.errors import DataDamagedError, ObjectNotFoundError
from stratavault.repo import _collect, _formats as F, _reading
from stratavault.repo._index import ChunkIndex

if TYPE_CHECKING:
    from stratavault.repo._repository import Repository

__all__ = [
    "damaged_index_names",
    "index_packs",
    "rebuild_index",
    "recover_unindexed_packs",
    "sync_index",
]

_SYNC_ATTEMPTS = 5
"""Listings of ``index/`` before giving up when its objects keep changing under us."""


def sync_index(repo: Repository) -> None:
    """Load the cached chunk index and bring it up to date with ``index/``.

    An index object that is gone between listing and reading was replaced by a prune
    running beside us (it writes the new objects before it deletes the old): list again.
    """
    for attempt in range(_SYNC_ATTEMPTS):
        try:
            _sync_index_once(repo)
            return
        except ObjectNotFoundError:
            if attempt == _SYNC_ATTEMPTS - 1:
                raise


def _sync_index_once(repo: Repository) -> None:
    names = {obj.name for obj in repo.storage.list(F.INDEX_PREFIX)}
    cache_dir = repo._cache_dir
    cached = ChunkIndex.load(cache_dir) if cache_dir is not None else None
    index, covered = cached if cached is not None and cached[1] <= names else (ChunkIndex(), set())
    missing = sorted(names - covered)
    damaged: list[str] = []
    for name in missing:
        try:
            packs, entries = repo._read_index_object(name)
        except DataDamagedError:
            damaged.append(name)  # its packs look unindexed: `repair index` rebuilds
            continue
        numbers = [index.pack_number(p) for p in packs]
        entries["pack"] = [numbers[n] for n in entries["pack"]]
        index.add_entries(entries)
    names -= set(damaged)  # not covered: read (and skipped) again at the next open
    with repo._lock:
        repo._index, repo._index_objects = index, names
        repo._cache_covers = set(cached[1]) if cached is not None else None  # what the file says
    repo._save_cache()  # when it covers other index objects than the cache did


def damaged_index_names(repo: Repository) -> list[str]:
    """Read and authenticate every index object (not the cache); return the damaged ones."""
    damaged = []
    for obj in repo.storage.list(F.INDEX_PREFIX):
        try:
            repo._read_index_object(obj.name)
        except DataDamagedError:
            damaged.append(obj.name)
    return sorted(damaged)


def rebuild_index(repo: Repository) -> tuple[int, list[str], list[str]]:
    """See :meth:`Repository.rebuild_index`."""
    repo.flush()
    old = {obj.name for obj in repo.storage.list(F.INDEX_PREFIX)}
    found, unreadable = _reading.read_pack_headers(repo.storage, repo._keys)
    with repo._lock:
        previous = dict(repo._index.by_pack()) if unreadable else {}
        repo._index, repo._index_objects = ChunkIndex(), set()
    # A damaged header does not make its chunks unreadable (each is authenticated on its
    # own): the entries the old index had for such a pack are kept.
    kept = [(name, previous[name]) for name in unreadable if name in previous]
    index_packs(repo, found + kept)
    for name in sorted(old - repo._index_objects):
        repo.storage.delete(name)
    for plan in repo.storage.list(F.GC_PREFIX):
        repo.storage.delete(plan.name)
    repo._save_cache()
    return len(found), unreadable, [name for name, _entries in kept]


def recover_unindexed_packs(repo: Repository) -> int:
    """See :meth:`Repository.recover_unindexed_packs`."""
    repo.flush()
    with repo._lock:
        known = set(repo._index.packs)
    known |= _collect.planned_packs(repo)  # prune is deleting them: never re-index
    found, _unreadable = _reading.read_pack_headers(repo.storage, repo._keys, skip=known)
    index_packs(repo, found)
    repo._save_cache()
    return len(found)


def index_packs(repo: Repository, found: list[tuple[str, Any]]) -> None:
    """Add packs' header entries to the index and write index objects for them."""
    step = repo._opt.index_every_packs
    for start in range(0, len(found), step):
        batch = found[start : start + step]
        with repo._lock:
            for name, entries in batch:
                repo._index.add_pack(name, entries)
        repo._write_index(batch)
