"""``stratavault forget``: remove snapshots that a retention policy does not keep."""

from __future__ import annotations

import argparse
import datetime as dt
import re
from typing import TYPE_CHECKING

from stratavault.cli._cmd_prune import add_prune_options, run_prune
from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output
from stratavault.errors import UsageError

if TYPE_CHECKING:
    from stratavault.jobs import ForgetGroup

_DURATION = re.compile(r"(\d+)([ywdh]|m)")
_UNIT_HOURS = {"y": 365 * 24, "m": 30 * 24, "w": 7 * 24, "d": 24, "h": 1}


def parse_duration(text: str) -> dt.timedelta:
    """``1y2m3w4d5h`` (years = 365 days, months = 30 days) as a time span."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"duration {text!r}: expected e.g. 7d, 2w, 1y6m, 12h")
    return dt.timedelta(hours=sum(int(n) * _UNIT_HOURS[u] for n, u in parts))


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("forget", parents=[common], help="remove snapshots a policy does not keep")
    p.add_argument(
        "snapshot_ids",
        nargs="*",
        metavar="SNAPSHOT",
        help="remove exactly these snapshots (id prefixes) instead of applying a policy",
    )
    for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(
            f"--keep-{name}",
            type=int,
            default=0,
            metavar="N",
            help=f"keep the {name} N" if name == "last" else f"keep N {name} snapshots",
        )
    p.add_argument(
        "--keep-within",
        type=parse_duration,
        metavar="DURATION",
        help="keep snapshots younger than this (e.g. 7d, 2w, 1y6m)",
    )
    p.add_argument(
        "--keep-tag",
        action="append",
        default=[],
        metavar="TAG",
        help="keep snapshots with this tag (repeatable)",
    )
    p.add_argument(
        "--group-by",
        default="host,paths",
        help="group snapshots by these of host,paths,tags ('' for one group)",
    )
    p.add_argument("--host", dest="hosts", action="append", default=[], help="only this host")
    p.add_argument("--tag", dest="tags", action="append", default=[], help="only these tags")
    p.add_argument("--path", dest="paths", action="append", default=[], help="only these paths")
    p.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="show what would be kept and why, remove nothing",
    )
    p.add_argument("--prune", action="store_true", help="run prune afterwards")
    add_prune_options(p)
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Apply the policy per group and print the decisions."""
    from stratavault.jobs import forget_snapshots
    from stratavault.snapshot import RetentionPolicy

    policy = RetentionPolicy(
        last=ns.keep_last,
        hourly=ns.keep_hourly,
        daily=ns.keep_daily,
        weekly=ns.keep_weekly,
        monthly=ns.keep_monthly,
        yearly=ns.keep_yearly,
        within=ns.keep_within,
        tags=tuple(ns.keep_tag),
    )
    if ns.snapshot_ids and not policy.empty:
        raise UsageError("forget: give snapshot ids or --keep-* rules, not both")
    group_by = [] if ns.snapshot_ids else [g for g in ns.group_by.split(",") if g]
    bad = set(group_by) - {"host", "paths", "tags"}
    if bad:
        raise UsageError(f"--group-by: unknown {sorted(bad)}; use host, paths, tags")
    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        groups = forget_snapshots(
            repo,
            policy,
            group_by=group_by,
            hosts=ns.hosts,
            tags=ns.tags,
            paths=ns.paths,
            ids=ns.snapshot_ids,
            dry_run=ns.dry_run,
        )
        _report(out, groups, group_by, ns.dry_run, pruning=ns.prune)
        if ns.prune:
            run_prune(repo, ns, out)
    return 0


def _report(
    out: Output, groups: list[ForgetGroup], group_by: list[str], dry_run: bool, *, pruning: bool
) -> None:
    """A table per group (and one JSON document) with each snapshot's fate and reasons."""
    doc = []
    for group in groups:
        out.text(f"group {dict(zip(group_by, group.key, strict=True)) or 'all'}:")
        rows = [
            (
                d.snapshot.short_id,
                d.snapshot.time.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
                "keep" if d.keep else ("would remove" if dry_run else "removed"),
                ", ".join(d.reasons),
            )
            for d in group.decisions
        ]
        out.table(["ID", "Time", "Action", "Kept by"], rows)
        out.text()
        snapshots = [
            {
                "id": d.snapshot.id,
                "time": d.snapshot.time.isoformat(),
                "keep": d.keep,
                "reasons": d.reasons,
            }
            for d in group.decisions
        ]
        doc.append({"group": list(group.key), "snapshots": snapshots})
    removed = sum(not d.keep for g in groups for d in g.decisions)
    verb = "would remove" if dry_run else "removed"
    out.text(f"{verb} {removed} snapshot(s)" + ("" if pruning else "; the data stays until prune"))
    out.data({"message_type": "forget", "dry_run": dry_run, "groups": doc})
