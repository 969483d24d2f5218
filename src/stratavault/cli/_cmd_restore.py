"""``stratavault restore SNAPSHOT[:PATH] --target DIR``: restore files."""

from __future__ import annotations

import argparse
from pathlib import Path

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output, format_bytes, make_progress
from stratavault.errors import RestoreError
from stratavault.jobs import Cancellation, RestoreOptions, restore_files, split_snapshot_ref
from stratavault.snapshot import find_snapshot


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("restore", parents=[common], help="restore files from a snapshot")
    p.add_argument(
        "snapshot",
        metavar="SNAPSHOT[:PATH]",
        help="'latest' or an id; with :PATH the contents of that folder",
    )
    p.add_argument("-t", "--target", type=Path, required=True, help="folder to restore into")
    p.add_argument(
        "-i",
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="restore only paths matching PATTERN (and what is below them)",
    )
    p.add_argument(
        "-e",
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out paths matching PATTERN",
    )
    p.add_argument("--verify", action="store_true", help="re-read and check what was written")
    p.add_argument(
        "--ignore-errors",
        action="store_true",
        help="restore what is readable when data is damaged; list what is not",
    )
    p.add_argument(
        "--numeric-owner", action="store_true", help="restore owners by number, not by name"
    )
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Restore and report; exit 1 if some entries could not be restored."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    ref, path = split_snapshot_ref(ns.snapshot)
    job = RestoreOptions(
        target=ns.target,
        path=path,
        includes=tuple(ns.include),
        excludes=tuple(ns.exclude),
        verify=ns.verify,
        ignore_errors=ns.ignore_errors,
        numeric_owner=ns.numeric_owner,
    )
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        snap = find_snapshot(repo, ref)
        result = restore_files(repo, snap, job, progress=progress, cancel=Cancellation())
    for where, error in result.issues:
        out.warn(f"{where}: {error}")
    out.text(
        f"restored {result.files} files, {result.dirs} folders, {result.others} other "
        f"entries ({format_bytes(result.bytes_written)}) from snapshot {snap.short_id} "
        f"to {ns.target}"
    )
    if ns.verify:
        out.text(f"verified {result.files_verified} files")
    out.data(
        {
            "message_type": "summary",
            "snapshot_id": snap.id,
            "files": result.files,
            "dirs": result.dirs,
            "others": result.others,
            "bytes_written": result.bytes_written,
            "files_verified": result.files_verified,
            "issues": [{"path": p, "error": e} for p, e in result.issues],
        }
    )
    if result.issues:
        raise RestoreError(f"{len(result.issues)} entries could not be restored or verified")
    return 0
