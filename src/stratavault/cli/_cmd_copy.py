"""``stratavault copy --from REPO --to REPO``: copy snapshots between repositories."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from stratavault.cli._context import GlobalOptions
from stratavault.cli._output import Output, format_bytes, make_progress
from stratavault.cli._passphrases import add_from_password_options, open_other_repo
from stratavault.errors import DataDamagedError

if TYPE_CHECKING:
    from stratavault.jobs import CopyResult


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser(
        "copy",
        parents=[common],
        help="copy snapshots to another repository (only the chunks it lacks travel)",
    )
    p.add_argument(
        "snapshot_ids", nargs="*", metavar="SNAPSHOT", help="copy these (id prefixes) only"
    )
    p.add_argument("--from", dest="source", required=True, metavar="REPO", help="source")
    p.add_argument("--to", dest="target", required=True, metavar="REPO", help="target")
    p.add_argument("--host", action="append", default=[], help="only snapshots of this host")
    p.add_argument("--tag", action="append", default=[], help="only snapshots with these tags")
    p.add_argument("--path", action="append", default=[], help="only snapshots of these paths")
    add_from_password_options(p, "from")
    add_from_password_options(p, "to")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Copy and report what was copied, skipped and sent."""
    from stratavault.jobs import Cancellation, CopyOptions, copy_snapshots

    out = Output(json_mode=options.json, quiet=options.quiet)
    selection = CopyOptions(
        snapshot_ids=tuple(ns.snapshot_ids),
        hosts=tuple(ns.host),
        tags=tuple(ns.tag),
        paths=tuple(ns.path),
    )
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    with (
        open_other_repo(options, ns.source, ns, "from") as source,
        open_other_repo(options, ns.target, ns, "to") as target,
    ):
        result = copy_snapshots(source, target, selection, progress=progress, cancel=Cancellation())
    report(out, result)
    if result.damaged:
        raise DataDamagedError(
            f"copy from {ns.source} - {len(result.damaged)} snapshot object(s) could not be "
            "read and were not copied (run `check` on the source)"
        )
    return 0


def report(out: Output, result: CopyResult) -> None:
    """One line per snapshot, then the totals; or one JSON document."""
    for source_id, target_id in result.copied:
        out.text(f"copied snapshot {source_id[:8]} as {target_id[:8]}")
    for snapshot_id, problem in result.damaged:
        out.warn(f"not copied: snapshot {snapshot_id[:8]} is damaged: {problem}")
    for source_id, target_id in result.skipped:
        out.text(f"skipped snapshot {source_id[:8]}: already copied as {target_id[:8]}")
    mode = "shared chunk ids" if result.shared_ids else "different chunk-id keys"
    out.text(
        f"{len(result.copied)} copied, {len(result.skipped)} skipped ({mode}); read "
        f"{result.chunks_read} chunks ({format_bytes(result.bytes_read)}), added "
        f"{result.chunks_added} ({format_bytes(result.bytes_added_stored)} stored)"
    )
    out.data(
        {
            "message_type": "copy",
            "shared_ids": result.shared_ids,
            "copied": [{"source": s, "target": t} for s, t in result.copied],
            "skipped": [{"source": s, "target": t} for s, t in result.skipped],
            "chunks_read": result.chunks_read,
            "bytes_read": result.bytes_read,
            "chunks_added": result.chunks_added,
            "bytes_added_stored": result.bytes_added_stored,
            "damaged": [{"id": i, "problem": p} for i, p in result.damaged],
        }
    )
