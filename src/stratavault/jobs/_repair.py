"""Use case: repair the repository's index by re-reading every pack's own header."""

from __future__ import annotations

from dataclasses import dataclass, field

from stratavault.repo import Repository

__all__ = ["RepairIndexResult", "repair_index"]


@dataclass(slots=True)
class RepairIndexResult:
    """Packs indexed anew, packs whose header could not be read (and those of them whose
    entries in the old index were kept), and the damaged index objects replaced."""

    packs: int = 0
    unreadable_packs: list[str] = field(default_factory=list)
    kept_packs: list[str] = field(default_factory=list)
    replaced_index_objects: list[str] = field(default_factory=list)


def repair_index(repo: Repository) -> RepairIndexResult:
    """Rebuild the index from the packs under the exclusive lock (no backup runs meanwhile)."""
    with repo.lock(exclusive=True):
        damaged = repo.damaged_index_names()
        packs, unreadable, kept = repo.rebuild_index()
    return RepairIndexResult(packs, unreadable, kept, damaged)
