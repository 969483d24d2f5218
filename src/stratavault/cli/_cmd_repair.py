"""``stratavault repair index|snapshots``: rebuild the index from the packs; rewrite
damaged snapshots without their unreadable parts."""

from __future__ import annotations

import argparse

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output, make_progress
from stratavault.errors import DataDamagedError


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
    snaps = what.add_parser(
        "snapshots",
        parents=[common],
        help="rewrite damaged snapshots without their unreadable parts",
    )
    snaps.add_argument(
        "snapshots", nargs="*", metavar="SNAPSHOT", help="only these (id prefix or 'latest')"
    )
    snaps.add_argument(
        "--forget", action="store_true", help="remove each damaged original once repaired"
    )
    snaps.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    snaps.set_defaults(run=run_snapshots)


def run_index(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Rebuild and report what was done."""
    from stratavault.jobs import repair_index

    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        result = repair_index(repo)
    out.text(
        f"indexed {result.packs} packs; replaced the damaged index objects: "
        f"{len(result.replaced_index_objects)}"
    )
    for pack in result.unreadable_packs:
        if pack in result.kept_packs:
            out.warn(f"pack {pack}: header damaged; its entries in the old index were kept")
        else:
            out.warn(f"pack {pack}: header unreadable, its chunks are not in the index")
    out.data(
        {
            "message_type": "repair_index",
            "packs": result.packs,
            "unreadable_packs": result.unreadable_packs,
            "kept_packs": result.kept_packs,
            "damaged_index_objects": result.replaced_index_objects,
        }
    )
    return DataDamagedError.exit_code if result.unreadable_packs else 0


def run_snapshots(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Repair (or with --dry-run list) damaged snapshots and report each change."""
    from stratavault.jobs import Cancellation, repair_snapshots

    out = Output(json_mode=options.json, quiet=options.quiet)
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        result = repair_snapshots(
            repo,
            snapshots=tuple(ns.snapshots),
            forget=ns.forget,
            dry_run=ns.dry_run,
            progress=progress,
            cancel=Cancellation(),
        )
    would = "would be " if result.dry_run else ""
    for r in result.repaired:
        if r.new_id is None:
            out.text(
                f"snapshot {r.original[:8]}: {len(r.removed)} damaged part(s) would be removed"
            )
        else:
            gone = "; original forgotten" if r.forgotten else ""
            out.text(f"snapshot {r.original[:8]}: repaired as {r.new_id[:8]}{gone}")
        for e in r.removed:
            out.text(f"  {e.path}: {e.error}")
    if not result.repaired:
        out.text(
            f"checked {result.snapshots_checked} snapshots: no damaged snapshot, nothing to do"
        )
    else:
        out.text(f"{len(result.repaired)} snapshot(s) {would}repaired")
    out.data(
        {
            "message_type": "repair_snapshots",
            "dry_run": result.dry_run,
            "snapshots_checked": result.snapshots_checked,
            "damages": result.damages,
            "snapshots": [
                {
                    "original": r.original,
                    "new_id": r.new_id,
                    "forgotten": r.forgotten,
                    "removed": [{"path": e.path, "error": e.error} for e in r.removed],
                }
                for r in result.repaired
            ],
        }
    )
    return 0
