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
"""Listings of ``index/`` in a row that read nothing before an object was gone, before
giving up."""


def sync_index(repo: Repository) -> None:
    """Load the cached chunk index and bring it up to date with ``index/``.

    An index object that is gone between listing and reading was replaced by a prune
    running beside us (it writes the new objects before it deletes the old): list again
    and read the objects not read yet. What was read stays (a prune that runs again and
    again must not keep us from ever finishing); such an index holds more than the objects
    listed now, which is safe for a holder of a lock taken before the listing (prune waits
    for it before deleting those packs), and its cache names the gone objects, so no other
    process trusts it.
    """
    names = _listed(repo)
    cache_dir = repo._cache_dir
    cached = ChunkIndex.load(cache_dir) if cache_dir is not None else None
    index, covered = cached if cached is not None and cached[1] <= names else (ChunkIndex(), set())
    done, damaged = set(covered), set[str]()
    fruitless = 0
    while True:
        try:
            for name in sorted(names - done - damaged):
                if _add_index_object(repo, index, name):
                    done.add(name)
                else:
                    damaged.add(name)  # its packs look unindexed: `repair index` rebuilds
                fruitless = 0
            break
        except ObjectNotFoundError:
            fruitless += 1
            if fruitless == _SYNC_ATTEMPTS:
                raise
            names = _listed(repo)
    with repo._lock:  # damaged objects are not covered: read (and skipped) at the next open
        repo._index, repo._index_objects = index, done
        repo._cache_covers = set(cached[1]) if cached is not None else None  # what the file says
    repo._save_cache()  # when it covers other index objects than the cache did


def _listed(repo: Repository) -> set[str]:
    return {obj.name for obj in repo.storage.list(F.INDEX_PREFIX)}


def _add_index_object(repo: Repository, index: ChunkIndex, name: str) -> bool:
    """Add the entries of index object ``name`` to ``index``; False when it is damaged."""
    try:
        packs, entries = repo._read_index_object(name)
    except DataDamagedError:
        return False
    numbers = [index.pack_number(p) for p in packs]
    entries["pack"] = [numbers[n] for n in entries["pack"]]
    index.add_entries(entries)
    return True


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
