"""What a backup is: snapshots, file trees and (later) disk indexes and retention rules."""

from stratavault.snapshot._retention import (
    RetentionDecision,
    RetentionPolicy,
    apply_retention,
    group_snapshots,
)
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
    load_tree_docs,
    resolve_path,
    save_snapshot,
    save_tree,
    save_tree_docs,
    walk_tree,
)
from stratavault.snapshot._tree import (
    ContentRun,
    Node,
    NodeType,
    TreeDocs,
    content_runs,
    decode_tree,
    encode_tree,
    tree_docs,
)

__all__ = [
    "ContentRun",
    "FileError",
    "Node",
    "NodeType",
    "RetentionDecision",
    "RetentionPolicy",
    "Snapshot",
    "SnapshotSummary",
    "TreeDocs",
    "apply_retention",
    "content_runs",
    "decode_tree",
    "encode_tree",
    "find_snapshot",
    "group_snapshots",
    "latest",
    "load_snapshots",
    "load_tree",
    "load_tree_docs",
    "resolve_path",
    "save_snapshot",
    "save_tree",
    "save_tree_docs",
    "select_snapshots",
    "tree_docs",
    "walk_tree",
]
