"""Use cases: backup, restore, browsing; each a function over a repository."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stratavault._lazy import lazy_exports

if TYPE_CHECKING:
    from stratavault.jobs._backup_disk import (
        DEFAULT_DISK_CHUNK_BYTES as DEFAULT_DISK_CHUNK_BYTES,
        DISK_KINDS as DISK_KINDS,
        MAX_DISK_CHUNKS as MAX_DISK_CHUNKS,
        BackupDisksOptions as BackupDisksOptions,
        DiskSource as DiskSource,
        backup_disks as backup_disks,
        new_disk_chunk_bytes as new_disk_chunk_bytes,
    )
    from stratavault.jobs._backup_files import backup_files as backup_files
    from stratavault.jobs._backup_images import backup_images as backup_images
    from stratavault.jobs._backup_run import BackupFilesOptions as BackupFilesOptions
    from stratavault.jobs._backup_sources import (
        ReadAhead as ReadAhead,
        start_read_ahead as start_read_ahead,
    )
    from stratavault.jobs._backup_vm import (
        BackupVmOptions as BackupVmOptions,
        backup_vm as backup_vm,
    )
    from stratavault.jobs._browse import (
        DiffEntry as DiffEntry,
        SnapshotSize as SnapshotSize,
        diff_snapshots as diff_snapshots,
        list_entries as list_entries,
        snapshot_size as snapshot_size,
        split_snapshot_ref as split_snapshot_ref,
    )
    from stratavault.jobs._check import (
        CheckResult as CheckResult,
        Damage as Damage,
        Subset as Subset,
        check_repository as check_repository,
    )
    from stratavault.jobs._copy import (
        CopyOptions as CopyOptions,
        CopyResult as CopyResult,
        copy_snapshots as copy_snapshots,
        shares_chunk_ids as shares_chunk_ids,
    )
    from stratavault.jobs._disk_info import DiskInfo as DiskInfo, describe_disks as describe_disks
    from stratavault.jobs._disk_ranges import chunk_runs as chunk_runs, read_groups as read_groups
    from stratavault.jobs._disk_reader import (
        DiskReader as DiskReader,
        open_disk_reader as open_disk_reader,
    )
    from stratavault.jobs._flr import (
        FlrIssue as FlrIssue,
        FlrRef as FlrRef,
        FlrRestoreOptions as FlrRestoreOptions,
        FlrResult as FlrResult,
        FlrSession as FlrSession,
        flr_dump as flr_dump,
        flr_list as flr_list,
        flr_restore as flr_restore,
        list_disk_volumes as list_disk_volumes,
        parse_flr_ref as parse_flr_ref,
    )
    from stratavault.jobs._forget import (
        ForgetGroup as ForgetGroup,
        forget_snapshots as forget_snapshots,
    )
    from stratavault.jobs._instant import (
        InstantOptions as InstantOptions,
        InstantVm as InstantVm,
        migrate_instant_vm as migrate_instant_vm,
        start_instant_vm as start_instant_vm,
    )
    from stratavault.jobs._nbd_source import NbdDiskSource as NbdDiskSource
    from stratavault.jobs._progress import (
        Cancellation as Cancellation,
        NullProgress as NullProgress,
        Progress as Progress,
        ProgressState as ProgressState,
    )
    from stratavault.jobs._protect import set_protection as set_protection
    from stratavault.jobs._prune import (
        PruneResult as PruneResult,
        live_chunk_ids as live_chunk_ids,
        prune as prune,
    )
    from stratavault.jobs._repair import (
        RepairIndexResult as RepairIndexResult,
        repair_index as repair_index,
    )
    from stratavault.jobs._repair_snapshots import (
        RepairSnapshotsResult as RepairSnapshotsResult,
        SnapshotRepair as SnapshotRepair,
        repair_snapshots as repair_snapshots,
    )
    from stratavault.jobs._restore_disk import (
        DISK_FORMATS as DISK_FORMATS,
        RestoreDiskOptions as RestoreDiskOptions,
        RestoreDiskResult as RestoreDiskResult,
        restore_disk as restore_disk,
        select_disk as select_disk,
    )
    from stratavault.jobs._restore_files import (
        RestoreOptions as RestoreOptions,
        RestoreResult as RestoreResult,
        restore_files as restore_files,
    )
    from stratavault.jobs._restore_vm import (
        RestoreVmOptions as RestoreVmOptions,
        RestoreVmResult as RestoreVmResult,
        restore_vm as restore_vm,
    )
    from stratavault.jobs._serve import (
        ChunkStoreBackend as ChunkStoreBackend,
        ServeOptions as ServeOptions,
        SnapshotServer as SnapshotServer,
        serve_snapshot as serve_snapshot,
    )
    from stratavault.jobs._verify import (
        BootCheckOptions as BootCheckOptions,
        BootCheckResult as BootCheckResult,
        verify_boot as verify_boot,
    )
    from stratavault.jobs._vm_boot import (
        disk_files as disk_files,
        vm_command as vm_command,
        without_network as without_network,
    )

__all__, __getattr__ = lazy_exports(__name__, __file__)
