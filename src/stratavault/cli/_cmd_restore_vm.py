"""``stratavault restore vm SNAPSHOT --to DIR [--start]``: a whole VM back, optionally running;
``restore vm SNAPSHOT --instant [--to DIR] [--migrate-to DIR]``: running now on served disks."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stratavault._malloc import keep_freed_memory
from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output, format_bytes, make_progress
from stratavault.errors import Interrupted, UsageError


def run_vm(ns: argparse.Namespace, ref: str, options: GlobalOptions) -> int:
    """Restore every disk and the configuration; with --start, start the VM."""
    keep_freed_memory()  # large buffers allocated and freed over and over
    from stratavault.jobs import RestoreVmOptions, restore_vm
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=options.json, quiet=options.quiet)
    job = RestoreVmOptions(
        target_dir=Path(ns.to), format=ns.format, start=ns.start, name=ns.name,
        verify=ns.verify, no_network=ns.no_network,
    )  # fmt: skip
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


def run_instant(ns: argparse.Namespace, ref: str, options: GlobalOptions) -> int:
    """Start the VM on served disks; with --migrate-to, move them to local disks and stay
    until QEMU has switched over."""
    from stratavault.jobs import InstantOptions, migrate_instant_vm, start_instant_vm
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=options.json, quiet=options.quiet)
    if ns.start or ns.format or ns.verify:
        raise UsageError("restore vm --instant: --start, --format and --verify do not apply")
    if ns.to:
        run_dir = Path(ns.to)
    else:
        import tempfile

        run_dir = Path(tempfile.mkdtemp(prefix="sv-instant-", dir="/tmp"))
    started = time.monotonic()
    with open_repo(options) as repo:
        snap = find_snapshot(repo, ref)
        vm = start_instant_vm(repo, snap, InstantOptions(run_dir=run_dir, name=ns.name))
    out.text(
        f"instant VM from snapshot {snap.short_id} started in {time.monotonic() - started:.1f} s: "
        f"QEMU pid {vm.qemu_pid}, QMP socket {vm.qmp_socket}"
    )
    out.text(f"disks served by pid {vm.server_pid} (it stops when QEMU stops); writes go to:")
    for disk, overlay in vm.overlays.items():
        out.text(f"  {disk}: {overlay}")
    doc: dict[str, object] = {
        "message_type": "instant_vm", "snapshot_id": snap.id, "run_dir": str(run_dir),
        "qemu_pid": vm.qemu_pid, "server_pid": vm.server_pid, "qmp_socket": str(vm.qmp_socket),
        "overlays": {k: str(v) for k, v in vm.overlays.items()}, "command": vm.command,
    }  # fmt: skip
    out.data(doc)
    sys.stdout.flush()
    if ns.migrate_to is None:
        return 0
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    try:
        limit = (ns.migrate_limit or 0) * 1024
        moved = migrate_instant_vm(vm, ns.migrate_to, progress=progress, speed_bytes_per_s=limit)
    except KeyboardInterrupt:
        raise Interrupted(
            f"migration cancelled; the VM (pid {vm.qemu_pid}) runs on from its instant "
            f"overlays, served by pid {vm.server_pid}"
        ) from None
    for disk, path in moved.items():
        out.text(f"disk {disk} now on {path}")
    out.text(
        f"migrated in {time.monotonic() - started:.1f} s; the export is released, "
        "the VM runs on local disks"
    )
    out.data({"message_type": "migrated", "disks": {k: str(v) for k, v in moved.items()}})
    return 0
