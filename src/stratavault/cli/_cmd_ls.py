"""``stratavault ls SNAPSHOT[:PATH]``: list the entries (or the disks) of a snapshot."""

from __future__ import annotations

import argparse
import datetime as dt
import stat
from typing import TYPE_CHECKING

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._flr import ls_flr
from stratavault.cli._output import Output, format_bytes

if TYPE_CHECKING:
    from stratavault.repo import Repository
    from stratavault.snapshot import Node, Snapshot

_TYPE_CHAR = {
    "dir": "d",
    "symlink": "l",
    "fifo": "p",
    "chardev": "c",
    "blockdev": "b",
    "socket": "s",
    "file": "-",
}


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("ls", parents=[common], help="list files in a snapshot")
    p.add_argument(
        "snapshot",
        metavar="SNAPSHOT[:PATH]",
        help="'latest' or an id, with a path; for disk snapshots SNAPSHOT:DISK lists "
        "partitions and SNAPSHOT:DISK[:PARTITION]/PATH the files of a filesystem",
    )
    p.add_argument("-l", "--long", action="store_true", help="mode, owner, size and time")
    p.add_argument("--no-recursive", action="store_true", help="only the folder's own entries")
    p.set_defaults(run=run)


def node_json(path: str, node: Node) -> dict[str, object]:
    """An entry as printed by ``--json``."""
    return {
        "path": path,
        "name": node.name,
        "type": node.type,
        "mode": node.mode,
        "uid": node.uid,
        "gid": node.gid,
        "user": node.user,
        "group": node.group,
        "size": node.size,
        "mtime_ns": node.mtime_ns,
        "link_target": node.link_target,
    }


def _long(path: str, node: Node) -> str:
    mode = _TYPE_CHAR.get(node.type, "?") + stat.filemode(node.mode)[1:]
    when = dt.datetime.fromtimestamp(node.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
    owner = f"{node.user or node.uid}/{node.group or node.gid}"
    link = f" -> {node.link_target}" if node.link_target else ""
    return f"{mode} {owner:>15} {node.size:>12} {when} {path}{link}"


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Print the entries below the path, parents first."""
    from stratavault.jobs import list_entries, split_snapshot_ref
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=options.json, quiet=options.quiet)
    ref, path = split_snapshot_ref(ns.snapshot)
    with open_repo(options) as repo:
        snap = find_snapshot(repo, ref)
        if snap.tree is None and ":" in ns.snapshot:  # SNAPSHOT:DISK[:PART][/PATH]: FLR
            recursive = not ns.no_recursive
            return ls_flr(out, repo, snap, ns.snapshot, long=ns.long, recursive=recursive)
        if snap.tree is None:
            _list_disks(out, repo, snap)
            return 0
        for entry_path, node in list_entries(repo, snap, path, recursive=not ns.no_recursive):
            out.data(node_json(entry_path, node))
            out.text(_long(entry_path, node) if ns.long else entry_path)
    return 0


def _list_disks(out: Output, repo: Repository, snap: Snapshot) -> None:
    """A snapshot of disks: one line per disk."""
    from stratavault.jobs import describe_disks

    disks = describe_disks(repo, snap)
    for d in disks:
        out.data({"type": "disk", **d.to_json()})
    out.table(
        ["Disk", "Size", "Data", "Chunk size", "Path"],
        [
            (
                d.name,
                format_bytes(d.size_bytes),
                format_bytes(d.data_bytes),
                format_bytes(d.chunk_bytes),
                d.path,
            )
            for d in disks
        ],
    )
