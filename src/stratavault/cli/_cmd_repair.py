"""``stratavault repair index``: rebuild the index from the packs."""

from __future__ import annotations

import argparse

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output
from stratavault.jobs import repair_index


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("repair", parents=[common], help="repair the repository")
    what = p.add_subparsers(dest="repair_what", metavar="WHAT", required=True)
    index = what.add_parser(
        "index", parents=[common], help="rebuild the index from the packs' own headers"
    )
    index.set_defaults(run=run_index)


def run_index(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Rebuild and report what was done."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        result = repair_index(repo)
    out.text(
        f"indexed {result.packs} packs; replaced the damaged index objects: "
        f"{len(result.replaced_index_objects)}"
    )
    for pack in result.unreadable_packs:
        out.warn(f"pack {pack}: header unreadable, its chunks are not in the index")
    out.data(
        {
            "message_type": "repair_index",
            "packs": result.packs,
            "unreadable_packs": result.unreadable_packs,
            "damaged_index_objects": result.replaced_index_objects,
        }
    )
    return 0
