"""``stratavault restore vm SNAPSHOT --to DIR [--start]``: a whole VM back, optionally running."""

from __future__ import annotations

import argparse
from pathlib import Path

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output, format_bytes, make_progress
from stratavault.jobs import RestoreVmOptions, restore_vm
from stratavault.snapshot import find_snapshot


def run_vm(ns: argparse.Namespace, ref: str, options: GlobalOptions) -> int:
    """Restore every disk and the configuration; with --start, start the VM."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    job = RestoreVmOptions(
        target_dir=Path(ns.to), format=ns.format, start=ns.start, name=ns.name, verify=ns.verify
    )
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        snap = find_snapshot(repo, ref)
        result = restore_vm(repo, snap, job, progress=progress)
    for res in result.results:
        out.text(
            f"disk {res.disk}: {format_bytes(res.size_bytes)} -> {result.disks[res.disk]} "
            f"({format_bytes(res.bytes_written)} written)"
        )
    out.text(f"configuration: {result.config_path}")
    if result.command is not None:
        out.text(f"start it with: {job.target_dir / 'start.sh'}")
    if result.pid is not None:
        out.text(f"started: pid {result.pid}, QMP socket {result.qmp_socket}")
    out.data(
        {
            "message_type": "restore_vm",
            "snapshot_id": snap.id,
            "disks": {name: str(path) for name, path in result.disks.items()},
            "config": str(result.config_path),
            "command": result.command,
            "pid": result.pid,
            "qmp_socket": str(result.qmp_socket) if result.qmp_socket else None,
        }
    )
    return 1 if any(res.issues for res in result.results) else 0
