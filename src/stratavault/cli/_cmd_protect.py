"""``stratavault protect|unprotect SNAPSHOT``: keep a snapshot whatever the policy says."""

from __future__ import annotations

import argparse

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add both commands to the parser."""
    for name, flag, what in (
        ("protect", True, "no policy removes it"),
        ("unprotect", False, "policies apply again"),
    ):
        p = sub.add_parser(name, parents=[common], help=f"mark a snapshot: {what}")
        p.add_argument("snapshot", help="'latest' or an id")
        p.set_defaults(run=run, protected=flag)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Set or clear the flag; the snapshot gets a new id."""
    from stratavault.jobs import set_protection
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        snap = find_snapshot(repo, ns.snapshot)
        old_id = snap.id
        snap = set_protection(repo, snap, protected=ns.protected)
    state = "protected" if snap.protected else "not protected"
    out.text(f"snapshot {old_id[:8]} is {state}; its id is now {snap.short_id}")
    out.data(
        {"message_type": "protection", "old_id": old_id, "id": snap.id, "protected": snap.protected}
    )
    return 0
