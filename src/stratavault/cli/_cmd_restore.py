"""``stratavault restore SNAPSHOT[:PATH] --target DIR`` (files) and
``stratavault restore disk SNAPSHOT[:DISK] --to FILE|DEVICE`` (a disk)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from stratavault._defaults import DISK_FORMATS
from stratavault._malloc import keep_freed_memory
from stratavault.cli._cmd_restore_vm import run_instant, run_vm
from stratavault.cli._context import GlobalOptions, open_repo, path_arg
from stratavault.cli._flr import restore_flr
from stratavault.cli._output import Output, format_bytes, make_progress
from stratavault.cli._preload import restore_modules
from stratavault.errors import RestoreError, UsageError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser(
        "restore",
        parents=[common],
        help="restore files, or a disk, from a snapshot",
        description="restore SNAPSHOT[:PATH] --target DIR restores files; "
        "restore disk SNAPSHOT[:DISK] --to FILE|DEVICE restores a disk.",
    )
    p.add_argument(
        "words",
        nargs="+",
        metavar="[disk] SNAPSHOT[:PATH|:DISK]",
        help="'latest' or an id; with :PATH the contents of that folder; after 'disk', "
        ":DISK names the disk (needed when the snapshot has several); a disk snapshot's "
        "SNAPSHOT:DISK[:PARTITION]/PATH restores files out of its filesystem",
    )
    p.add_argument("-t", "--target", type=path_arg, help="files: folder to restore into")
    _add_disk_options(p)
    _add_file_options(p)
    _add_vm_options(p)
    p.set_defaults(run=run)


def _add_disk_options(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("disks")
    d.add_argument(
        "--to", metavar="FILE|DEVICE|NBD-URI", help="disk: new file, a device or an NBD export"
    )
    d.add_argument(
        "--format",
        choices=DISK_FORMATS,
        help="disk: image format of --to (default raw); vm: of every disk (default: original)",
    )
    d.add_argument(
        "--onto", metavar="EXISTING", help="disk: overwrite this disk (file, device, NBD URI)"
    )
    d.add_argument(
        "--changed-only",
        action="store_true",
        help="disk, with --onto: compare and write only the chunks that differ",
    )


def _add_file_options(p: argparse.ArgumentParser) -> None:
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


def _add_vm_options(p: argparse.ArgumentParser) -> None:
    v = p.add_argument_group("VMs")
    v.add_argument("--start", action="store_true", help="vm: start it from the restored disks")
    v.add_argument(
        "--no-network", action="store_true", help="vm: without its network devices (-nic none)"
    )
    v.add_argument("--name", default="", help="vm, with --start: its name (default: NAME-restored)")
    v.add_argument(
        "--instant",
        action="store_true",
        help="vm: start it now on disks served from the repository (--to: its run folder)",
    )
    v.add_argument(
        "--migrate-to",
        type=path_arg,
        metavar="DIR",
        help="vm, --instant: then move the disks here",
    )
    v.add_argument(
        "--migrate-limit",
        type=int,
        metavar="KiB/s",
        help="vm, --migrate-to: limit the copy of each disk (spare the storage)",
    )


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Dispatch: ``restore disk ...`` or a restore of files."""
    words: list[str] = ns.words
    if words[0] == "vm":
        if len(words) != 2 or ns.target or ns.onto or ns.changed_only:
            raise UsageError("usage: restore vm SNAPSHOT --to DIR [--format F] [--start]")
        if ns.instant:
            return run_instant(ns, words[1], options)
        if ns.to is None or ns.migrate_to is not None:
            raise UsageError("usage: restore vm SNAPSHOT --to DIR (--migrate-to needs --instant)")
        return run_vm(ns, words[1], options)
    if ns.start or ns.name or ns.instant or ns.migrate_to or ns.migrate_limit or ns.no_network:
        raise UsageError(
            "restore: --start, --name, --no-network, --instant, --migrate-to are for restore vm"
        )
    if words[0] == "disk":  # never a snapshot reference: those are 'latest' or hex
        if len(words) != 2 or ns.target or ns.include or ns.exclude or ns.ignore_errors:
            raise UsageError("usage: restore disk SNAPSHOT[:DISK] --to FILE|DEVICE (or --onto)")
        return run_disk(ns, words[1], options)
    if len(words) != 1:
        raise UsageError(f"restore: unexpected arguments {' '.join(words[1:])!r}")
    if ns.target is None:
        raise UsageError("restore: --target DIR is required (restore disk takes --to)")
    if ns.to or ns.onto or ns.changed_only or ns.format is not None:
        raise UsageError("restore: --to, --onto, --changed-only, --format are for restore disk")
    return run_files(ns, words[0], options)


def run_disk(ns: argparse.Namespace, word: str, options: GlobalOptions) -> int:
    """Restore one disk; exit 1 when verification finds a difference."""
    keep_freed_memory()  # large buffers allocated and freed over and over
    out = Output(json_mode=options.json, quiet=options.quiet)
    ref, _, disk = word.partition(":")
    if (ns.to is None) == (ns.onto is None):
        raise UsageError("restore disk: give exactly one of --to FILE|DEVICE and --onto EXISTING")
    where: str = ns.to or ns.onto
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    nbd = where.startswith(("nbd://", "nbd+unix://"))
    onto = Path(ns.onto) if ns.onto and not nbd else None
    preload = restore_modules(onto, qcow2=ns.format == "qcow2")
    with open_repo(options, preload=preload) as repo:
        from stratavault.jobs import Cancellation, RestoreDiskOptions, restore_disk
        from stratavault.snapshot import find_snapshot

        job = RestoreDiskOptions(
            target=where if nbd else Path(where),
            disk=disk or None,
            format=ns.format or "raw",
            onto=ns.onto is not None,
            changed_only=ns.changed_only,
            verify=ns.verify,
        )
        snap = find_snapshot(repo, ref)
        result = restore_disk(repo, snap, job, progress=progress, cancel=Cancellation())
    for issue in result.issues:
        out.warn(issue)
    if result.bitmap_used:
        out.text(
            f"the disk still has the snapshot's dirty bitmap: {result.chunks_unchanged} of "
            f"{result.chunks} chunks unchanged since, nothing read"
        )
    elif ns.changed_only:
        if result.bitmap_problem:
            out.text(f"dirty bitmap not usable ({result.bitmap_problem}): comparing instead")
        out.text(
            f"compared {result.chunks} chunks ({format_bytes(result.bytes_read)} read): "
            f"{result.chunks_unchanged} unchanged"
        )
    out.text(
        f"restored disk {result.disk} ({format_bytes(result.size_bytes)}) from snapshot "
        f"{snap.short_id} to {job.target}: wrote {result.chunks_written} chunks "
        f"({format_bytes(result.bytes_written)}), zeroed {result.chunks_zeroed}"
    )
    if ns.verify:
        out.text(f"verified {result.chunks_verified} chunks")
    doc: dict[str, object] = {"message_type": "summary", "snapshot_id": snap.id}
    doc.update(dataclasses.asdict(result))
    out.data(doc)
    if result.issues:
        raise RestoreError(f"disk {result.disk}: {len(result.issues)} ranges failed to verify")
    return 0


def run_files(ns: argparse.Namespace, word: str, options: GlobalOptions) -> int:
    """Restore files and report; exit 1 if some entries could not be restored."""
    from stratavault.jobs import Cancellation, RestoreOptions, restore_files, split_snapshot_ref
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=options.json, quiet=options.quiet)
    ref, path = split_snapshot_ref(word)
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
        if snap.tree is None and ":" in word:  # SNAPSHOT:DISK[:PART]/PATH: file-level restore
            return restore_flr(ns, repo, snap, word, options)
        if snap.tree is None:
            names = ", ".join(d.name for d in snap.disks)
            raise UsageError(
                f"snapshot {snap.short_id} holds disks ({names}), not files: "
                f"use restore disk {snap.short_id}[:DISK] --to FILE"
            )
        result = restore_files(repo, snap, job, progress=progress, cancel=Cancellation())
    for where, error in result.issues:
        out.warn(f"{where}: {error}")
    out.text(
        f"restored {result.files} files, {result.dirs} folders, {result.others} other "
        f"entries ({format_bytes(result.bytes_written)}) from snapshot {snap.short_id} "
        f"to {ns.target}"
    )
    if result.skipped:
        out.text(f"left out {len(result.skipped)} sockets (not restored; their programs make them)")
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
            "skipped": result.skipped,
        }
    )
    if result.issues:
        raise RestoreError(f"{len(result.issues)} entries could not be restored or verified")
    return 0
