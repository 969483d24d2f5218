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
from stratavault.jobs._check import CheckResult, Damage, Subset, check_repository
from stratavault.jobs._forget import ForgetGroup, forget_snapshots
from stratavault.jobs._progress import Cancellation, NullProgress, Progress, ProgressState
from stratavault.jobs._protect import set_protection
from stratavault.jobs._repair import RepairIndexResult, repair_index
from stratavault.jobs._restore_files import RestoreOptions, RestoreResult, restore_files

__all__ = [
    "BackupFilesOptions",
    "Cancellation",
    "CheckResult",
    "Damage",
    "DiffEntry",
    "ForgetGroup",
    "NullProgress",
    "Progress",
    "ProgressState",
    "RepairIndexResult",
    "RestoreOptions",
    "RestoreResult",
    "SnapshotSize",
    "Subset",
    "backup_files",
    "check_repository",
    "diff_snapshots",
    "forget_snapshots",
    "list_entries",
    "repair_index",
    "restore_files",
    "set_protection",
    "snapshot_size",
    "split_snapshot_ref",
]
