"""Use cases: backup, restore, browsing; each a function over a repository."""

from stratavault.jobs._backup_files import BackupFilesOptions, backup_files
from stratavault.jobs._browse import (
    DiffEntry,
    SnapshotSize,
    diff_snapshots,
    list_entries,
    snapshot_size,
    split_snapshot_ref,
)
from stratavault.jobs._progress import Cancellation, NullProgress, Progress, ProgressState

__all__ = [
    "BackupFilesOptions",
    "Cancellation",
    "DiffEntry",
    "NullProgress",
    "Progress",
    "ProgressState",
    "SnapshotSize",
    "backup_files",
    "diff_snapshots",
    "list_entries",
    "snapshot_size",
    "split_snapshot_ref",
]
