"""Use case: forget snapshots that a retention policy does not keep.

Forgetting removes snapshot objects only; the data they referenced stays in the
repository until ``prune`` (a later issue) collects what no snapshot uses.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stratavault.errors import DataDamagedError
from stratavault.repo import Repository
from stratavault.snapshot import (
    RetentionDecision,
    RetentionPolicy,
    Snapshot,
    apply_retention,
    find_snapshot,
    group_snapshots,
    load_snapshots,
    select_snapshots,
)

__all__ = ["ForgetGroup", "forget_snapshots"]


@dataclass(slots=True)
class ForgetGroup:
    """One group of snapshots (by host/paths/tags) and what the policy decided for each."""

    key: tuple[str, ...]
    decisions: list[RetentionDecision]


def _named(repo: Repository, ref: str) -> RetentionDecision:
    """The decision for a snapshot named on the command line (removed unless protected); a
    damaged snapshot object is removed too, under a placeholder."""
    try:
        snap = find_snapshot(repo, ref)
    except DataDamagedError:
        sid = repo.resolve_snapshot_id(ref)
        placeholder = Snapshot(dt.datetime.fromtimestamp(0, dt.UTC), "?", ["(damaged)"], None)
        placeholder.id = sid
        return RetentionDecision(placeholder, [])
    return RetentionDecision(snap, ["protected"] if snap.protected else [])


def forget_snapshots(
    repo: Repository,
    policy: RetentionPolicy,
    *,
    group_by: Sequence[str] = ("host", "paths"),
    hosts: Sequence[str] = (),
    tags: Sequence[str] = (),
    paths: Sequence[str] = (),
    ids: Sequence[str] = (),
    dry_run: bool = False,
    tz: dt.tzinfo | None = None,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> list[ForgetGroup]:
    """Apply ``policy`` to each group of the selected snapshots; remove the unkept ones
    (unless ``dry_run``). With ``ids`` (unique id prefixes), remove exactly those snapshots
    instead (protected ones stay). Takes the exclusive lock, so no backup runs meanwhile."""
    with repo.lock(exclusive=not dry_run):
        if ids:
            groups = [ForgetGroup((), [_named(repo, ref) for ref in ids])]
        else:
            usable = load_snapshots(repo, damaged=[])  # damaged ones go only when named
            chosen = select_snapshots(usable, hosts=hosts, tags=tags, paths=paths)
            now = clock()
            groups = [
                ForgetGroup(key, apply_retention(members, policy, now=now, tz=tz))
                for key, members in sorted(group_snapshots(chosen, by=group_by).items())
            ]
        if not dry_run:
            for group in groups:
                for decision in group.decisions:
                    if not decision.keep:
                        repo.remove_snapshot(decision.snapshot.id)
    return groups
