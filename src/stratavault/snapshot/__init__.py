"""What a backup is: snapshots, file trees and (later) disk indexes and retention rules."""

from stratavault.snapshot._snapshot import (
    FileError,
    Snapshot,
    SnapshotSummary,
    latest,
    select_snapshots,
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
    "latest",
    "select_snapshots",
]
