"""``stratavault backup vm``: back up a running QEMU VM through its QMP socket."""

from __future__ import annotations

import argparse
import socket

from stratavault._defaults import (
    DEFAULT_DISK_CHUNK_BYTES,
    DEFAULT_DISK_FRAME_BYTES,
    DEFAULT_LIBVIRT_URI,
)
from stratavault._malloc import keep_freed_memory
from stratavault.cli._context import GlobalOptions, open_repo, path_arg
from stratavault.cli._disk_report import report_disk_backup
from stratavault.cli._output import Output, make_progress
from stratavault.cli._preload import backup_modules


def register_vm(
    kinds: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``backup vm`` to the ``backup`` command."""
    v = kinds.add_parser(
        "vm", parents=[common], help="back up a running VM (QEMU or libvirt; all disks)"
    )
    which = v.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--libvirt", metavar="DOMAIN", default="", help="a libvirt domain (name or UUID)"
    )
    v.add_argument(
        "--connect",
        default=DEFAULT_LIBVIRT_URI,
        metavar="URI",
        help=f"libvirt connection URI (default {DEFAULT_LIBVIRT_URI})",
    )
    which.add_argument(
        "--qmp",
        type=path_arg,
        metavar="SOCKET",
        help="the VM's QMP unix socket (QEMU serves one client per monitor: give the backup "
        "a monitor of its own, e.g. -qmp unix:/run/vm1-backup.qmp,server=on,wait=off)",
    )
    v.add_argument("--name", default="", help="the VM's name in snapshots (default: -name)")
    v.add_argument(
        "--guest-agent",
        type=path_arg,
        metavar="SOCKET",
        help="guest agent socket (default: found among the VM's chardevs)",
    )
    add_tags(v)
    v.add_argument("--host", default=socket.gethostname(), help="host name to record")
    v.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_DISK_CHUNK_BYTES >> 10,
        metavar="KiB",
        help=f"disk chunk size of new disks in KiB (default {DEFAULT_DISK_CHUNK_BYTES >> 10}); "
        "a disk over 256 GiB gets larger chunks, so that it has at most 4,194,304",
    )
    add_frame_size(v)
    v.add_argument("--compression", type=int, default=3, metavar="LEVEL", help="zstd level")
    v.add_argument("--scratch-dir", type=path_arg, help="folder for fleecing overlays and sockets")
    v.set_defaults(run=run_vm)


def add_tags(parser: argparse.ArgumentParser) -> None:
    """``--tag``: labels of the new snapshot; repeatable, and commas separate tags (as in
    restic: ``--tag a,b`` gives two)."""
    parser.add_argument(
        "--tag",
        action="extend",
        type=_tags,
        default=[],
        metavar="TAG[,TAG...]",
        help="tag the snapshot (repeatable; commas separate tags)",
    )


def _tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def add_frame_size(parser: argparse.ArgumentParser) -> None:
    """``--frame-size``: how many bytes of new neighbouring disk chunks compress together."""
    parser.add_argument(
        "--frame-size",
        type=_frame_size,
        default=DEFAULT_DISK_FRAME_BYTES,
        metavar="KiB",
        help="compress new neighbouring disk chunks together in frames of up to this many"
        f" KiB (default {DEFAULT_DISK_FRAME_BYTES >> 10}; the chunk size or 0: one by one)",
    )


def _frame_size(text: str) -> int:
    try:
        kib = int(text)
    except ValueError:
        kib = -1
    if not 0 <= kib <= 16384:
        raise argparse.ArgumentTypeError(f"frame size {text!r}: 0 to 16384 (KiB)")
    return kib << 10


def run_vm(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Back up the VM and print the summary."""
    keep_freed_memory()  # large buffers allocated and freed over and over
    out = Output(json_mode=options.json, quiet=options.quiet)
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    with open_repo(options, preload=backup_modules(vm=True, qmp=bool(ns.qmp))) as repo:
        from stratavault.jobs import BackupVmOptions, backup_vm

        job = BackupVmOptions(
            qmp_socket=ns.qmp,
            libvirt_domain=ns.libvirt,
            libvirt_uri=ns.connect,
            name=ns.name,
            guest_agent_socket=ns.guest_agent,
            tags=tuple(ns.tag),
            host=ns.host,
            chunk_bytes=ns.chunk_size << 10,
            frame_bytes=ns.frame_size,
            compression_level=ns.compression,
            scratch_dir=ns.scratch_dir,
        )
        snap = backup_vm(repo, job, progress=progress)
    config = snap.vm_config or {}
    out.text(f"VM {snap.paths[0]}: {config.get('consistency', '')}")
    return report_disk_backup(out, snap)
