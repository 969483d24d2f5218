"""``stratavault diff SNAPSHOT1 SNAPSHOT2``: what changed between two snapshots."""

from __future__ import annotations

import argparse

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("diff", parents=[common], help="show differences between two snapshots")
    p.add_argument("first", metavar="SNAPSHOT1")
    p.add_argument("second", metavar="SNAPSHOT2")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Print one line per change (+ added, - removed, M modified, U metadata) and totals."""
    from stratavault.jobs import diff_snapshots
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=options.json, quiet=options.quiet)
    counts = {"+": 0, "-": 0, "M": 0, "U": 0}
    added = removed = 0
    with open_repo(options) as repo:
        first, second = find_snapshot(repo, ns.first), find_snapshot(repo, ns.second)
        for entry in diff_snapshots(repo, first, second):
            counts[entry.change] += 1
            if entry.change == "+":
                added += entry.node.size
            elif entry.change == "-":
                removed += entry.node.size
            out.text(f"{entry.change:<2} {entry.path}")
            out.data(
                {
                    "message_type": "change",
                    "modifier": entry.change,
                    "path": entry.path,
                    "type": entry.node.type,
                }
            )
    out.text()
    out.text(
        f"added {counts['+']}, removed {counts['-']}, modified {counts['M']}, "
        f"metadata changed {counts['U']}"
    )
    out.data(
        {
            "message_type": "statistics",
            "added": counts["+"],
            "removed": counts["-"],
            "modified": counts["M"],
            "metadata": counts["U"],
            "added_bytes": added,
            "removed_bytes": removed,
            "source": first.id,
            "target": second.id,
        }
    )
    return 0
