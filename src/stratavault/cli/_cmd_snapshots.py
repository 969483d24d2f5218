"""``stratavault snapshots``: list snapshots."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output, format_bytes

if TYPE_CHECKING:
    from stratavault.snapshot import Snapshot


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("snapshots", parents=[common], help="list snapshots")
    add_filters(p)
    p.set_defaults(run=run)


def add_filters(p: argparse.ArgumentParser) -> None:
    """Options that select snapshots by host, tag and path."""
    p.add_argument("--host", dest="hosts", action="append", default=[], help="only this host")
    p.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        help="only snapshots with these tags (a,b = both; repeat = either)",
    )
    p.add_argument(
        "--path",
        dest="paths",
        action="append",
        default=[],
        help="only snapshots of exactly these paths",
    )


def snapshot_json(s: Snapshot) -> dict[str, object]:
    """The JSON form of a snapshot in listings."""
    doc = s.to_document()
    doc.update(id=s.id, short_id=s.short_id)
    return doc


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Print the matching snapshots, oldest first."""
    from stratavault.snapshot import load_snapshots, select_snapshots

    out = Output(json_mode=options.json, quiet=options.quiet)
    damaged: list[tuple[str, str]] = []
    with open_repo(options) as repo:
        usable = load_snapshots(repo, damaged=damaged)
        snaps = select_snapshots(usable, hosts=ns.hosts, tags=ns.tags, paths=ns.paths)
    for sid, problem in damaged:
        out.warn(f"snapshot {sid[:8]} is damaged and not listed: {problem}")
    out.data([snapshot_json(s) for s in snaps])
    rows = [
        (
            s.short_id,
            s.time.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            s.host,
            ",".join(s.tags),
            format_bytes(s.summary.bytes_processed),
            "incomplete" if s.incomplete else "",
            " ".join(s.paths),
        )
        for s in snaps
    ]
    out.table(["ID", "Time", "Host", "Tags", "Size", "State", "Paths"], rows)
    out.text(f"{len(snaps)} snapshots")
    return 12 if damaged else 0
