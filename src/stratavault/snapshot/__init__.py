"""What a backup is: snapshots, file trees and (later) disk indexes and retention rules."""

from stratavault.snapshot._snapshot import (
    FileError,
    Snapshot,
    SnapshotSummary,
    latest,
    select_snapshots,
)
from stratavault.snapshot._store import (
    find_snapshot,
    load_snapshots,
    load_tree,
    resolve_path,
    save_snapshot,
    save_tree,
    walk_tree,
)
from stratavault.snapshot._tree import ContentRun, Node, NodeType, decode_tree, encode_tree

__all__ = [
    "ContentRun",
    "FileError",
    "Node",
    "NodeType",
    "Snapshot",
    "SnapshotSummary",
    "decode_tree",
    "encode_tree",
    "find_snapshot",
    "latest",
    "load_snapshots",
    "load_tree",
    "resolve_path",
    "save_snapshot",
    "save_tree",
    "select_snapshots",
    "walk_tree",
]
