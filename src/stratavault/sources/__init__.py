"""What is backed up, seen from the file system: walking, reading and restoring trees.

- :func:`walk` lists a tree depth first with full ``lstat`` metadata and xattrs,
  applying exclude patterns (:class:`ExcludeMatcher`).
- :class:`SparseFileReader` reads a regular file's data regions, skips holes and
  tells whether the file changed while it was read (:class:`FileChangedError`).
- :func:`same_file_stat` tells whether a file is unchanged since a parent snapshot.
- :class:`FsRestorer` writes a tree back below a target without ever writing
  outside it; file content may arrive in any order from several threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stratavault._lazy import lazy_exports

if TYPE_CHECKING:
    from stratavault.sources._bitmap_chain import DEFAULT_BITMAP_PREFIX as DEFAULT_BITMAP_PREFIX
    from stratavault.sources._entry import (
        EntryMetadata as EntryMetadata,
        EntryType as EntryType,
        FileStamp as FileStamp,
        FsEntry as FsEntry,
        OwnerNames as OwnerNames,
        same_file_stat as same_file_stat,
    )
    from stratavault.sources._exclude import (
        ExcludeMatcher as ExcludeMatcher,
        read_exclude_file as read_exclude_file,
    )
    from stratavault.sources._export import (
        DiskExport as DiskExport,
        remove_backup_leftovers as remove_backup_leftovers,
    )
    from stratavault.sources._flr import (
        FlrEvent as FlrEvent,
        flr_lookup as flr_lookup,
        flr_read as flr_read,
        flr_walk as flr_walk,
    )
    from stratavault.sources._flr_fs import (
        FILESYSTEMS as FILESYSTEMS,
        FlrEntry as FlrEntry,
        FlrFilesystem as FlrFilesystem,
        open_filesystem as open_filesystem,
    )
    from stratavault.sources._flr_volumes import (
        FlrVolume as FlrVolume,
        list_volumes as list_volumes,
    )
    from stratavault.sources._folder_states import (
        FolderDone as FolderDone,
        FolderStates as FolderStates,
        KnownFolder as KnownFolder,
        WalkRecord as WalkRecord,
    )
    from stratavault.sources._guest_agent import GuestAgent as GuestAgent
    from stratavault.sources._image_export import (
        IMAGE_FORMATS as IMAGE_FORMATS,
        ImageExport as ImageExport,
        ImageServer as ImageServer,
    )
    from stratavault.sources._libvirt import (
        DEFAULT_LIBVIRT_URI as DEFAULT_LIBVIRT_URI,
        DomainDisk as DomainDisk,
        LibvirtDomain as LibvirtDomain,
    )
    from stratavault.sources._libvirt_backup import (
        LibvirtBackup as LibvirtBackup,
        remove_libvirt_backup_leftovers as remove_libvirt_backup_leftovers,
    )
    from stratavault.sources._qmp import QmpSession as QmpSession
    from stratavault.sources._raw_disk import (
        ImageInfo as ImageInfo,
        RawDiskSource as RawDiskSource,
        RawDiskTarget as RawDiskTarget,
        convert_image as convert_image,
        probe_image as probe_image,
        probe_image_format as probe_image_format,
    )
    from stratavault.sources._read import (
        DEFAULT_READ_BUFFER_BYTES as DEFAULT_READ_BUFFER_BYTES,
        FileChangedError as FileChangedError,
        SparseFileReader as SparseFileReader,
        prefetch_files as prefetch_files,
        read_file_extents as read_file_extents,
    )
    from stratavault.sources._restore import (
        ZEROS as ZEROS,
        FsRestorer as FsRestorer,
        RestoreFile as RestoreFile,
        RestoreIssue as RestoreIssue,
    )
    from stratavault.sources._safe_dirs import RelPath as RelPath, check_name as check_name
    from stratavault.sources._vm import (
        DirtyBitmap as DirtyBitmap,
        VmDisk as VmDisk,
        list_vm_disks as list_vm_disks,
        vm_config as vm_config,
    )
    from stratavault.sources._vm_backup import (
        Consistency as Consistency,
        VmBackup as VmBackup,
        find_guest_agent_socket as find_guest_agent_socket,
    )
    from stratavault.sources._walk import (
        ErrorHandler as ErrorHandler,
        TreeTotals as TreeTotals,
        prefetch_metadata as prefetch_metadata,
        read_xattrs as read_xattrs,
        walk as walk,
    )
    from stratavault.sources._walk_process import (
        StandbyWalker as StandbyWalker,
        TreeScan as TreeScan,
        walk_in_process as walk_in_process,
        walk_states_in_process as walk_states_in_process,
    )

__all__, __getattr__ = lazy_exports(__name__, __file__)
