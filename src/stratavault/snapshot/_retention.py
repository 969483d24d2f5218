"""Retention rules: which snapshots a policy keeps, and why (pure functions).

Rules follow restic's meaning. Snapshots are grouped (by default by host and paths) and
each group is looked at newest first:

- ``last`` N keeps the N newest snapshots;
- ``hourly``/``daily``/``weekly``/``monthly``/``yearly`` N keep, for each of the N newest
  periods that have a snapshot, the newest snapshot of that period. Periods are read in the
  policy's time zone (``tz``), on the wall clock: across a DST change a day is still the
  calendar day, an hour the wall-clock hour; weeks are ISO weeks;
- ``within`` keeps every snapshot taken less than that long before ``now``;
- ``tags`` keeps every snapshot that has one of these tags;
- a protected snapshot is always kept.

A snapshot is kept if any rule keeps it; the reasons are returned for ``--dry-run``.
An empty policy keeps everything (it would otherwise remove every snapshot).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from stratavault.snapshot._snapshot import Snapshot

__all__ = ["RetentionDecision", "RetentionPolicy", "apply_retention", "group_snapshots"]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How many snapshots of each kind to keep (0 = that rule keeps none)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: dt.timedelta | None = None
    tags: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """True when no rule is set."""
        counts = (self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly)
        return not any(counts) and self.within is None and not self.tags


@dataclass(slots=True)
class RetentionDecision:
    """One snapshot and the rules that keep it (none: it is to be removed)."""

    snapshot: Snapshot
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        """Whether any rule keeps the snapshot."""
        return bool(self.reasons)


_Period = Callable[[dt.datetime], tuple[int, ...]]

_PERIODS: tuple[tuple[str, _Period], ...] = (
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: (t.year,)),
)


def group_snapshots(
    snapshots: Iterable[Snapshot], *, by: Sequence[str] = ("host", "paths")
) -> dict[tuple[str, ...], list[Snapshot]]:
    """Group snapshots by ``host``, ``paths`` and/or ``tags`` (each group newest first)."""
    groups: dict[tuple[str, ...], list[Snapshot]] = {}
    for snap in snapshots:
        key = tuple(
            {
                "host": snap.host,
                "paths": ",".join(sorted(snap.paths)),
                "tags": ",".join(sorted(snap.tags)),
            }[name]
            for name in by
        )
        groups.setdefault(key, []).append(snap)
    for members in groups.values():
        members.sort(key=lambda s: (s.time, s.id), reverse=True)
    return groups


def apply_retention(
    snapshots: Sequence[Snapshot],
    policy: RetentionPolicy,
    *,
    now: dt.datetime,
    tz: dt.tzinfo | None = None,
) -> list[RetentionDecision]:
    """Decide for one group of snapshots (any order) which the policy keeps; newest first.

    ``now`` is the clock for ``within``; ``tz`` the time zone of the periods (default UTC).
    """
    zone = tz or ZoneInfo("UTC")
    ordered = sorted(snapshots, key=lambda s: (s.time, s.id), reverse=True)
    decisions = [RetentionDecision(s, ["protected"] if s.protected else []) for s in ordered]
    if policy.empty:
        for d in decisions:
            d.reasons.append("no policy")
        return decisions
    for i, d in enumerate(decisions):
        if i < policy.last:
            d.reasons.append("last")
        if policy.within is not None and now - d.snapshot.time < policy.within:
            d.reasons.append("within")
        if set(policy.tags) & set(d.snapshot.tags):
            d.reasons.append("tag")
    for name, period in _PERIODS:
        count = getattr(policy, name)
        seen: set[tuple[int, ...]] = set()
        for d in decisions:
            if len(seen) >= count:
                break
            key = period(d.snapshot.time.astimezone(zone))
            if key not in seen:
                seen.add(key)
                d.reasons.append(name)
    return decisions
