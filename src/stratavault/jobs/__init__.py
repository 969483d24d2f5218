"""Use cases: backup, restore, browsing; each a function over a repository."""

from stratavault.jobs._backup_disk import (
    DEFAULT_DISK_CHUNK_BYTES,
    DISK_KINDS,
    BackupDisksOptions,
    DiskSource,
    backup_disks,
    chunk_runs,
)
from stratavault.jobs._backup_files import BackupFilesOptions, backup_files
from stratavault.jobs._backup_vm import BackupVmOptions, backup_images, backup_vm
from stratavault.jobs._browse import (
    DiffEntry,
    SnapshotSize,
    diff_snapshots,
    list_entries,
    snapshot_size,
    split_snapshot_ref,
)
from stratavault.jobs._check import CheckResult, Damage, Subset, check_repository
from stratavault.jobs._copy import CopyOptions, CopyResult, copy_snapshots, shares_chunk_ids
from stratavault.jobs._disk_info import DiskInfo, describe_disks
from stratavault.jobs._disk_reader import DiskReader, open_disk_reader
from stratavault.jobs._flr import (
    FlrIssue,
    FlrRef,
    FlrRestoreOptions,
    FlrResult,
    FlrSession,
    flr_dump,
    flr_list,
    flr_restore,
    list_disk_volumes,
    parse_flr_ref,
)
from stratavault.jobs._forget import ForgetGroup, forget_snapshots
from stratavault.jobs._instant import (
    InstantOptions,
    InstantVm,
    migrate_instant_vm,
    start_instant_vm,
)
from stratavault.jobs._nbd_source import NbdDiskSource
from stratavault.jobs._progress import Cancellation, NullProgress, Progress, ProgressState
from stratavault.jobs._protect import set_protection
from stratavault.jobs._prune import PruneResult, live_chunk_ids, prune
from stratavault.jobs._repair import RepairIndexResult, repair_index
from stratavault.jobs._repair_snapshots import (
    RepairSnapshotsResult,
    SnapshotRepair,
    repair_snapshots,
)
from stratavault.jobs._restore_disk import (
    DISK_FORMATS,
    RestoreDiskOptions,
    RestoreDiskResult,
    restore_disk,
    select_disk,
)
from stratavault.jobs._restore_files import RestoreOptions, RestoreResult, restore_files
from stratavault.jobs._restore_vm import RestoreVmOptions, RestoreVmResult, restore_vm
from stratavault.jobs._serve import ChunkStoreBackend, ServeOptions, SnapshotServer, serve_snapshot
from stratavault.jobs._verify import BootCheckOptions, BootCheckResult, verify_boot
from stratavault.jobs._vm_boot import vm_command

__all__ = [
    "DEFAULT_DISK_CHUNK_BYTES",
    "DISK_FORMATS",
    "DISK_KINDS",
    "BackupDisksOptions",
    "BackupFilesOptions",
    "BackupVmOptions",
    "BootCheckOptions",
    "BootCheckResult",
    "Cancellation",
    "CheckResult",
    "ChunkStoreBackend",
    "CopyOptions",
    "CopyResult",
    "Damage",
    "DiffEntry",
    "DiskInfo",
    "DiskReader",
    "DiskSource",
    "FlrIssue",
    "FlrRef",
    "FlrRestoreOptions",
    "FlrResult",
    "FlrSession",
    "ForgetGroup",
    "InstantOptions",
    "InstantVm",
    "NbdDiskSource",
    "NullProgress",
    "Progress",
    "ProgressState",
    "PruneResult",
    "RepairIndexResult",
    "RepairSnapshotsResult",
    "RestoreDiskOptions",
    "RestoreDiskResult",
    "RestoreOptions",
    "RestoreResult",
    "RestoreVmOptions",
    "RestoreVmResult",
    "ServeOptions",
    "SnapshotRepair",
    "SnapshotServer",
    "SnapshotSize",
    "Subset",
    "backup_disks",
    "backup_files",
    "backup_images",
    "backup_vm",
    "check_repository",
    "chunk_runs",
    "copy_snapshots",
    "describe_disks",
    "diff_snapshots",
    "flr_dump",
    "flr_list",
    "flr_restore",
    "forget_snapshots",
    "list_disk_volumes",
    "list_entries",
    "live_chunk_ids",
    "migrate_instant_vm",
    "open_disk_reader",
    "parse_flr_ref",
    "prune",
    "repair_index",
    "repair_snapshots",
    "restore_disk",
    "restore_files",
    "restore_vm",
    "select_disk",
    "serve_snapshot",
    "set_protection",
    "shares_chunk_ids",
    "snapshot_size",
    "split_snapshot_ref",
    "start_instant_vm",
    "verify_boot",
    "vm_command",
]
