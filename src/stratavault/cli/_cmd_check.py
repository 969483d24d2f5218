"""``stratavault check [--read-data]``: verify the repository; exit 12 when damaged."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output, make_progress
from stratavault.errors import DataDamagedError

if TYPE_CHECKING:
    from stratavault.jobs import Subset


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("check", parents=[common], help="verify the repository")
    p.add_argument(
        "--read-data",
        action="store_true",
        help="also read, authenticate and decompress every chunk in use",
    )
    p.add_argument(
        "--read-data-subset",
        type=_subset,
        metavar="N/M|P%",
        help="read only part N of M of the packs (by name), or a random P%%",
    )
    p.set_defaults(run=run)


def _subset(text: str) -> Subset:
    from stratavault.jobs import Subset

    try:
        return Subset.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Check and print a report naming each damaged object and what uses it."""
    from stratavault.jobs import Cancellation, check_repository

    out = Output(json_mode=options.json, quiet=options.quiet)
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    with open_repo(options, object_cache=False) as repo:  # the backend's own objects
        result = check_repository(
            repo,
            read_data=ns.read_data,
            subset=ns.read_data_subset,
            progress=progress,
            cancel=Cancellation(),
        )
    out.text(
        f"checked {result.snapshots} snapshots, {result.trees} trees, {result.chunks} "
        f"chunks in {result.packs} packs"
        + (f"; read {result.chunks_read} chunks" if result.chunks_read else "")
    )
    for d in result.damages:
        out.text(f"DAMAGED {d.object}: {d.problem}")
        out.text(f"  snapshots: {', '.join(sorted(s[:8] for s in d.snapshots))}")
        for path in d.paths:
            out.text(f"  used by: {path}")
    out.data(
        {
            "message_type": "check",
            "snapshots": result.snapshots,
            "trees": result.trees,
            "chunks": result.chunks,
            "packs": result.packs,
            "chunks_read": result.chunks_read,
            "damages": [
                {
                    "object": d.object,
                    "problem": d.problem,
                    "snapshots": sorted(d.snapshots),
                    "paths": d.paths,
                }
                for d in result.damages
            ],
        }
    )
    if result.damages:
        raise DataDamagedError(f"check found {len(result.damages)} damaged object(s)")
    out.text("no errors were found")
    return 0
