"""Use case: protect a snapshot from retention policies, or lift the protection."""

from __future__ import annotations

from stratavault.repo import Repository
from stratavault.snapshot import Snapshot, save_snapshot

__all__ = ["set_protection"]


def set_protection(repo: Repository, snapshot: Snapshot, *, protected: bool) -> Snapshot:
    """Rewrite ``snapshot`` with the flag set and remove the old object; return the new one.

    Snapshots are content-named, so the id changes (as with restic's ``tag``). The new
    object is written before the old one is removed: a crash in between leaves both.
    """
    if snapshot.protected == protected:
        return snapshot
    with repo.lock(exclusive=True):
        old_id = snapshot.id
        snapshot.protected = protected
        save_snapshot(repo, snapshot)
        repo.remove_snapshot(old_id)
    return snapshot
