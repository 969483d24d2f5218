"""``stratavault dump SNAPSHOT:DISK[:PART]/PATH > files.tar``: files of a disk snapshot as tar."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import IO

from stratavault.cli._context import GlobalOptions, open_repo, path_arg
from stratavault.cli._output import Output, format_bytes
from stratavault.errors import RestoreError, UsageError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser(
        "dump",
        parents=[common],
        help="write a file or folder of a disk snapshot as a tar stream",
        description="dump SNAPSHOT:DISK[:PARTITION]/PATH writes PATH (a file, or a folder "
        "and everything below it) from the filesystem inside a disk snapshot as a tar "
        "stream, with modes, owners, times, symlinks and hard links.",
    )
    p.add_argument("ref", metavar="SNAPSHOT:DISK[:PARTITION]/PATH")
    p.add_argument(
        "-o", "--output", type=path_arg, metavar="FILE", help="write the tar here, not to stdout"
    )
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Write the tar; exit 1 (after the stream is complete) when entries were left out."""
    from stratavault.jobs import Cancellation, flr_dump, parse_flr_ref
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=False, quiet=options.quiet, stream=sys.stderr)
    ref = parse_flr_ref(ns.ref)
    if ns.output is None and sys.stdout.isatty():
        raise UsageError("dump: stdout is a terminal; redirect it to a file or use --output")
    with contextlib.ExitStack() as stack:
        sink: IO[bytes] = (
            stack.enter_context(ns.output.open("wb")) if ns.output else sys.stdout.buffer
        )
        repo = stack.enter_context(open_repo(options))
        snap = find_snapshot(repo, ref.snapshot)
        if snap.tree is not None:
            raise UsageError(f"dump: snapshot {snap.short_id} holds files, not disks (use restore)")
        result = flr_dump(repo, snap, ref, sink, cancel=Cancellation())
        sink.flush()
    for issue in result.issues:
        out.warn(f"{issue.path}: {issue.error}")
    out.text(
        f"dumped {result.files} files, {result.dirs} folders, {result.others} other entries "
        f"({format_bytes(result.bytes_written)})"
    )
    if result.issues:
        raise RestoreError(f"dump: {len(result.issues)} entries were left out")
    return 0
