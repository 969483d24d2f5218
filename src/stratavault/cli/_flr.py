"""File-level restore from disk snapshots, as ``ls``, ``restore`` and ``dump`` show it.

``ls SNAPSHOT:DISK`` lists the disk's partitions; ``ls SNAPSHOT:DISK[:PART]/PATH`` the
entries of a filesystem; ``restore SNAPSHOT:DISK[:PART]/PATH --target DIR`` restores them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import stat
from typing import TYPE_CHECKING

from stratavault.cli._context import GlobalOptions
from stratavault.cli._output import Output, format_bytes, make_progress
from stratavault.errors import RestoreError, UsageError

if TYPE_CHECKING:
    from stratavault.jobs import FlrIssue
    from stratavault.repo import Repository
    from stratavault.snapshot import Snapshot
    from stratavault.sources import FlrEntry

__all__ = ["flr_entry_json", "ls_flr", "restore_flr"]

_TYPE_CHAR = {"dir": "d", "symlink": "l", "fifo": "p", "chardev": "c", "blockdev": "b"}


def flr_entry_json(path: str, entry: FlrEntry) -> dict[str, object]:
    """An entry as ``ls --json`` prints it (the fields of ``ls`` of file snapshots)."""
    return {
        "path": path,
        "name": entry.name,
        "type": entry.type,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "atime_ns": entry.atime_ns,
        "ctime_ns": entry.ctime_ns,
        "nlink": entry.nlink,
        "inode": entry.inode,
        "link_target": entry.link_target,
    }


def _long(path: str, entry: FlrEntry) -> str:
    mode = _TYPE_CHAR.get(entry.type, "-") + stat.filemode(entry.mode)[1:]
    when = dt.datetime.fromtimestamp(entry.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
    link = f" -> {entry.link_target}" if entry.link_target is not None else ""
    return f"{mode} {f'{entry.uid}/{entry.gid}':>15} {entry.size:>12} {when} {path}{link}"


def ls_flr(
    out: Output, repo: Repository, snap: Snapshot, word: str, *, long: bool, recursive: bool
) -> int:
    """List partitions (``SNAPSHOT:DISK``) or entries (``SNAPSHOT:DISK[:PART]/PATH``)."""
    from stratavault.jobs import flr_list, list_disk_volumes, parse_flr_ref

    ref = parse_flr_ref(word)
    if ref.volume is None and "/" not in word:
        volumes = list_disk_volumes(repo, snap, ref.disk)
        for v in volumes:
            out.data({"type": "partition", "disk": ref.disk, **v.to_json()})
        out.table(
            ["Partition", "Start", "Size", "Filesystem", "Type", "Label"],
            [
                (v.name, v.offset, format_bytes(v.size_bytes), v.filesystem or "?", v.type, v.label)
                for v in volumes
            ],
        )
        return 0
    issues: list[FlrIssue] = []
    for path, entry in flr_list(repo, snap, ref, recursive=recursive, issues=issues):
        out.data(flr_entry_json(path, entry))
        out.text(_long(path, entry) if long else path)
    return _report(out, issues)


def _report(out: Output, issues: list[FlrIssue]) -> int:
    for issue in issues:
        out.warn(f"{issue.path}: {issue.error}")
    if issues:
        raise RestoreError(f"{len(issues)} entries could not be read (corrupt or unsafe)")
    return 0


def restore_flr(
    ns: argparse.Namespace, repo: Repository, snap: Snapshot, word: str, options: GlobalOptions
) -> int:
    """Restore a path of a filesystem inside a disk snapshot into ``--target``."""
    from stratavault.jobs import Cancellation, FlrRestoreOptions, flr_restore, parse_flr_ref

    out = Output(json_mode=options.json, quiet=options.quiet)
    ref = parse_flr_ref(word)
    if ns.include or ns.exclude or ns.verify or ns.ignore_errors:
        raise UsageError(
            "restore: --include, --exclude, --verify and --ignore-errors are for file "
            "snapshots, not for files out of a disk snapshot"
        )
    job = FlrRestoreOptions(target=ns.target, numeric_owner=ns.numeric_owner)
    progress = make_progress(json_mode=options.json, quiet=options.quiet)
    result = flr_restore(repo, snap, ref, job, progress=progress, cancel=Cancellation())
    out.text(
        f"restored {result.files} files, {result.dirs} folders, {result.others} other entries "
        f"({format_bytes(result.bytes_written)}) from {word} to {ns.target}"
    )
    out.data(
        {
            "message_type": "summary",
            "snapshot_id": snap.id,
            "files": result.files,
            "dirs": result.dirs,
            "others": result.others,
            "bytes_written": result.bytes_written,
            "issues": [{"path": i.path, "error": i.error} for i in result.issues],
        }
    )
    return _report(out, result.issues)
