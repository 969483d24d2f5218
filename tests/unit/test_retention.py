"""Retention rules as pure functions: GFS cases, time zones, DST, tags, within."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from stratavault.snapshot import (
    RetentionDecision,
    RetentionPolicy,
    Snapshot,
    apply_retention,
    group_snapshots,
)
from stratavault.types import ChunkId

UTC = dt.UTC


def snap(when: dt.datetime, *, host: str = "h", tags: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(
        time=when,
        host=host,
        paths=["/data"],
        tree=ChunkId(b"\0" * 32),
        tags=list(tags),
        id=when.isoformat(),
    )


def kept(decisions: list[RetentionDecision]) -> list[str]:
    return [d.snapshot.id for d in decisions if d.keep]


def test_empty_policy_keeps_everything() -> None:
    snaps = [snap(dt.datetime(2026, 1, d, tzinfo=UTC)) for d in range(1, 5)]
    decisions = apply_retention(snaps, RetentionPolicy(), now=dt.datetime(2026, 2, 1, tzinfo=UTC))
    assert all(d.keep for d in decisions)


def test_last_and_daily_gfs() -> None:
    # Two backups a day for 30 days.
    snaps = [
        snap(dt.datetime(2026, 3, 1, 1, tzinfo=UTC) + dt.timedelta(hours=12 * i)) for i in range(60)
    ]
    decisions = apply_retention(
        snaps,
        RetentionPolicy(last=3, daily=7, weekly=4, monthly=2),
        now=dt.datetime(2026, 4, 1, tzinfo=UTC),
    )
    assert [d.snapshot.time for d in decisions] == sorted((s.time for s in snaps), reverse=True)
    newest = decisions[0]
    assert newest.reasons == ["last", "daily", "weekly", "monthly"]
    daily = [d for d in decisions if "daily" in d.reasons]
    assert len(daily) == 7
    assert len({d.snapshot.time.date() for d in daily}) == 7  # one per day, the newest of it
    assert all(d.snapshot.time.hour == 13 for d in daily)
    assert len([d for d in decisions if "weekly" in d.reasons]) == 4
    monthly = [d.snapshot.time.month for d in decisions if "monthly" in d.reasons]
    assert monthly == [3]  # only one month has snapshots: the rule keeps what exists
    assert sum(d.keep for d in decisions) == len({d.snapshot.id for d in decisions if d.reasons})


def test_yearly_and_monthly_pick_newest_of_each_period() -> None:
    snaps = [
        snap(dt.datetime(y, m, 15, tzinfo=UTC)) for y in (2023, 2024, 2025) for m in (1, 6, 12)
    ]
    decisions = apply_retention(
        snaps, RetentionPolicy(yearly=2, monthly=2), now=dt.datetime(2026, 1, 1, tzinfo=UTC)
    )
    yearly = [d.snapshot.time for d in decisions if "yearly" in d.reasons]
    assert yearly == [dt.datetime(2025, 12, 15, tzinfo=UTC), dt.datetime(2024, 12, 15, tzinfo=UTC)]
    monthly = [d.snapshot.time for d in decisions if "monthly" in d.reasons]
    assert monthly == [dt.datetime(2025, 12, 15, tzinfo=UTC), dt.datetime(2025, 6, 15, tzinfo=UTC)]


def test_days_are_read_in_the_policy_time_zone() -> None:
    # 23:30 UTC on the 1st is already the 2nd in Berlin.
    a = snap(dt.datetime(2026, 1, 1, 22, 0, tzinfo=UTC))
    b = snap(dt.datetime(2026, 1, 1, 23, 30, tzinfo=UTC))
    now = dt.datetime(2026, 1, 3, tzinfo=UTC)
    in_utc = apply_retention([a, b], RetentionPolicy(daily=5), now=now)
    in_berlin = apply_retention(
        [a, b], RetentionPolicy(daily=5), now=now, tz=ZoneInfo("Europe/Berlin")
    )
    assert kept(in_utc) == [b.id]  # same UTC day: only the newest
    assert kept(in_berlin) == [b.id, a.id]  # two Berlin days


def test_dst_change_keeps_calendar_days_and_wall_clock_hours() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # 2026-10-25: clocks go back at 03:00 CEST -> 02:00 CET; 02:30 happens twice.
    first = dt.datetime(2026, 10, 25, 2, 30, tzinfo=berlin, fold=0)
    second = dt.datetime(2026, 10, 25, 2, 30, tzinfo=berlin, fold=1)
    assert second.astimezone(UTC) - first.astimezone(UTC) == dt.timedelta(hours=1)
    snaps = [
        snap(first.astimezone(UTC)),
        snap(second.astimezone(UTC)),
        snap(dt.datetime(2026, 10, 24, 23, 0, tzinfo=berlin).astimezone(UTC)),
    ]
    now = dt.datetime(2026, 10, 26, tzinfo=UTC)
    hourly = apply_retention(snaps, RetentionPolicy(hourly=10), now=now, tz=berlin)
    # The two 02:30 backups share the wall-clock hour 02:00-03:00: one of them is kept.
    assert len(kept(hourly)) == 2
    daily = apply_retention(snaps, RetentionPolicy(daily=10), now=now, tz=berlin)
    assert [d.snapshot.time.astimezone(berlin).day for d in daily if d.keep] == [25, 24]


def test_within_uses_the_injected_clock_and_tags_keep() -> None:
    now = dt.datetime(2026, 6, 30, 12, tzinfo=UTC)
    snaps = [
        snap(now - dt.timedelta(days=d), tags=("keep",) if d == 40 else ()) for d in (1, 5, 9, 40)
    ]
    decisions = apply_retention(
        snaps, RetentionPolicy(within=dt.timedelta(days=7), tags=("keep",)), now=now
    )
    assert [(d.snapshot.time, d.reasons) for d in decisions] == [
        (now - dt.timedelta(days=1), ["within"]),
        (now - dt.timedelta(days=5), ["within"]),
        (now - dt.timedelta(days=9), []),
        (now - dt.timedelta(days=40), ["tag"]),
    ]


def test_grouping_by_host_and_paths() -> None:
    t = dt.datetime(2026, 1, 1, tzinfo=UTC)
    snaps = [
        snap(t, host="a"),
        snap(t + dt.timedelta(hours=1), host="b"),
        snap(t + dt.timedelta(hours=2), host="a"),
    ]
    groups = group_snapshots(snaps)
    assert sorted(groups) == [("a", "/data"), ("b", "/data")]
    assert [s.time for s in groups[("a", "/data")]] == [t + dt.timedelta(hours=2), t]
    assert list(group_snapshots(snaps, by=())) == [()]
