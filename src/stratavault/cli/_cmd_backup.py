"""``stratavault backup files PATH...`` and ``backup image FILE...``: create a snapshot."""

from __future__ import annotations

import argparse
import socket
from typing import TYPE_CHECKING

from stratavault._defaults import DEFAULT_DISK_CHUNK_BYTES, IMAGE_FORMATS
from stratavault._malloc import keep_freed_memory
from stratavault.cli._cmd_backup_vm import add_frame_size, add_tags, register_vm
from stratavault.cli._context import GlobalOptions, open_repo, path_arg
from stratavault.cli._disk_report import report_disk_backup
from stratavault.cli._output import Output, format_bytes, make_progress, shows_progress
from stratavault.cli._preload import backup_modules

if TYPE_CHECKING:
    from stratavault.jobs import ReadAhead
from stratavault.errors import IncompleteSnapshotError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("backup", parents=[common], help="create a snapshot")
    kinds = p.add_subparsers(dest="backup_kind", metavar="KIND", required=True)
    f = kinds.add_parser("files", parents=[common], help="back up files and folders")
    f.add_argument("paths", nargs="+", type=path_arg, metavar="PATH")
    f.add_argument(
        "-e",
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="exclude paths matching PATTERN (gitignore-like globs)",
    )
    f.add_argument(
        "--exclude-file",
        action="append",
        default=[],
        type=path_arg,
        metavar="FILE",
        help="read exclude patterns from FILE",
    )
    f.add_argument(
        "-x", "--one-file-system", action="store_true", help="do not cross file system boundaries"
    )
    add_tags(f)
    f.add_argument("--host", default=socket.gethostname(), help="host name to record")
    f.add_argument("--parent", help="compare against this snapshot (default: latest of same paths)")
    f.add_argument("--force", action="store_true", help="read all files, even unchanged ones")
    f.add_argument(
        "--compression",
        type=_level,
        default=3,
        metavar="LEVEL",
        help="zstd level 1-19 (default 3)",
    )
    f.set_defaults(run=run)
    _register_image(kinds, common)
    register_vm(kinds, common)


def _register_image(
    kinds: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    i = kinds.add_parser(
        "image", parents=[common], help="back up disk images (raw, qcow2, vmdk...) or devices"
    )
    i.add_argument("files", nargs="+", type=path_arg, metavar="FILE")
    i.add_argument(
        "--name",
        action="append",
        default=[],
        help="disk name in the snapshot, once per FILE in order (default: the file name)",
    )
    add_tags(i)
    i.add_argument("--host", default=socket.gethostname(), help="host name to record")
    i.add_argument("--parent", help="parent snapshot (default: latest of the same files)")
    i.add_argument(
        "--format",
        choices=IMAGE_FORMATS,
        help="format of every FILE (default: probed with qemu-img, raw for devices); give "
        "it for images a guest wrote, whose start could pass for another format",
    )
    i.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default=DEFAULT_DISK_CHUNK_BYTES,
        metavar="KiB",
        help=f"disk chunk size in KiB (default {DEFAULT_DISK_CHUNK_BYTES >> 10}); a disk "
        "over 256 GiB gets larger chunks, so that it has at most 4,194,304",
    )
    add_frame_size(i)
    i.add_argument(
        "--compression",
        type=_level,
        default=3,
        metavar="LEVEL",
        help="zstd level 1-19 (default 3)",
    )
    i.set_defaults(run=run_image)


def _chunk_size(text: str) -> int:
    try:
        kib = int(text)
    except ValueError:
        kib = 0
    if kib < 64 or kib & (kib - 1) or kib > 65536:
        raise argparse.ArgumentTypeError(
            f"chunk size {text!r}: a power of two from 64 to 65536 (KiB)"
        )
    return kib << 10


def _level(text: str) -> int:
    """A zstd level for ``--compression`` (argparse reports a bad one as a usage error)."""
    try:
        level = int(text)
    except ValueError:
        level = 0
    if not 1 <= level <= 19:
        raise argparse.ArgumentTypeError(f"compression level {text!r} is not 1-19")
    return level


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Back up and print the summary; exit 4 when some files could not be read."""
    from stratavault.jobs import start_read_ahead

    read_ahead = start_read_ahead(  # first: it reads while the rest starts
        tuple(ns.paths),
        excludes=tuple(ns.exclude),
        exclude_files=tuple(ns.exclude_file),
        one_file_system=ns.one_file_system,
    )
    try:
        return _backup_files(ns, options, read_ahead)
    finally:
        read_ahead.stop()


def _backup_files(ns: argparse.Namespace, options: GlobalOptions, read_ahead: ReadAhead) -> int:
    out = Output(json_mode=options.json, quiet=options.quiet)
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:  # before the jobs' imports (see open_repo)
        from stratavault.jobs import BackupFilesOptions, Cancellation, backup_files

        job = BackupFilesOptions(
            paths=tuple(ns.paths),
            excludes=tuple(ns.exclude),
            exclude_files=tuple(ns.exclude_file),
            one_file_system=ns.one_file_system,
            tags=tuple(ns.tag),
            host=ns.host,
            parent=ns.parent,
            force_read=ns.force,
            compression_level=ns.compression,
            scan_totals=shows_progress(json_mode=options.json, quiet=options.quiet),
        )
        snap = backup_files(
            repo, job, progress=progress, cancel=Cancellation(), read_ahead=read_ahead
        )
    s = snap.summary
    out.text(
        f"Files: {s.files_new} new, {s.files_changed} changed, {s.files_unmodified} unmodified"
    )
    out.text(f"Dirs:  {s.dirs}")
    out.text(
        f"Added to the repository: {format_bytes(s.bytes_added_stored)} "
        f"({s.chunks_added} new chunks)"
    )
    out.text(
        f"processed {s.entries} entries, {format_bytes(s.bytes_processed)} in {s.duration_s:.2f}s"
    )
    out.text(f"snapshot {snap.short_id} saved" + (" (incomplete)" if snap.incomplete else ""))
    summary = {
        "message_type": "summary",
        "snapshot_id": snap.id,
        "incomplete": snap.incomplete,
        "errors": [{"path": e.path, "error": e.error} for e in snap.errors],
    }
    summary.update(snap.to_document()["summary"])
    out.data(summary)
    if snap.incomplete:
        raise IncompleteSnapshotError(
            f"snapshot {snap.short_id} saved, but {len(snap.errors)} path(s) could not be read"
        )
    return 0


def run_image(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Back up raw images / block devices into one snapshot and print the summary."""
    keep_freed_memory()  # large buffers allocated and freed over and over
    out = Output(json_mode=options.json, quiet=options.quiet)
    files = [p.absolute() for p in ns.files]
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    with open_repo(options, preload=backup_modules(files)) as repo:
        from stratavault.jobs import BackupDisksOptions, backup_images

        job = BackupDisksOptions(
            tags=tuple(ns.tag),
            host=ns.host,
            paths=tuple(str(p) for p in files),
            parent=ns.parent,
            chunk_bytes=ns.chunk_size,
            frame_bytes=ns.frame_size,
            compression_level=ns.compression,
        )
        snap = backup_images(
            repo, files, job, names=ns.name, image_format=ns.format, progress=progress
        )
    return report_disk_backup(out, snap)
