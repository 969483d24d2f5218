"""What a backup is: snapshots, file trees and (later) disk indexes and retention rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stratavault._lazy import lazy_exports

if TYPE_CHECKING:
    from stratavault.snapshot._disk import (
        SEGMENT_CHUNKS as SEGMENT_CHUNKS,
        DiskIndex as DiskIndex,
        DiskRef as DiskRef,
        decode_disk_segment as decode_disk_segment,
        disk_chunk_ids as disk_chunk_ids,
        encode_disk_segment as encode_disk_segment,
        load_disk_index as load_disk_index,
        save_disk_index as save_disk_index,
    )
    from stratavault.snapshot._retention import (
        RetentionDecision as RetentionDecision,
        RetentionPolicy as RetentionPolicy,
        apply_retention as apply_retention,
        group_snapshots as group_snapshots,
    )
    from stratavault.snapshot._snapshot import (
        FileError as FileError,
        RepairRecord as RepairRecord,
        Snapshot as Snapshot,
        SnapshotSummary as SnapshotSummary,
        latest as latest,
        select_snapshots as select_snapshots,
    )
    from stratavault.snapshot._store import (
        find_snapshot as find_snapshot,
        load_snapshots as load_snapshots,
        load_tree as load_tree,
        load_tree_docs as load_tree_docs,
        resolve_path as resolve_path,
        save_snapshot as save_snapshot,
        save_tree as save_tree,
        save_tree_docs as save_tree_docs,
        walk_tree as walk_tree,
    )
    from stratavault.snapshot._tree import (
        ContentRun as ContentRun,
        Node as Node,
        NodeType as NodeType,
        TreeDocs as TreeDocs,
        content_runs as content_runs,
        decode_tree as decode_tree,
        encode_tree as encode_tree,
        same_listing as same_listing,
        tree_docs as tree_docs,
    )

__all__, __getattr__ = lazy_exports(__name__, __file__)
