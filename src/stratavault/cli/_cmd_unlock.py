"""``stratavault unlock``: remove stale locks (or all with ``--remove-all``)."""

from __future__ import annotations

import argparse

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("unlock", parents=[common], help="remove stale locks")
    p.add_argument(
        "--remove-all", action="store_true", help="remove every lock, also those of live processes"
    )
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Break locks and say how many."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        removed = repo.break_locks() if ns.remove_all else repo.break_stale_locks()
    out.text(f"removed {removed} lock(s)")
    out.data({"message_type": "unlocked", "removed": removed})
    return 0
