"""What is backed up, seen from the file system: walking, reading and restoring trees.

- :func:`walk` lists a tree depth first with full ``lstat`` metadata and xattrs,
  applying exclude patterns (:class:`ExcludeMatcher`).
- :class:`SparseFileReader` reads a regular file's data regions, skips holes and
  tells whether the file changed while it was read (:class:`FileChangedError`).
- :func:`same_file_stat` tells whether a file is unchanged since a parent snapshot.
- :class:`FsRestorer` writes a tree back below a target without ever writing
  outside it; file content may arrive in any order from several threads.
"""

from stratavault.sources._bitmap_chain import DEFAULT_BITMAP_PREFIX
from stratavault.sources._entry import (
    EntryMetadata,
    EntryType,
    FileStamp,
    FsEntry,
    OwnerNames,
    same_file_stat,
)
from stratavault.sources._exclude import ExcludeMatcher, read_exclude_file
from stratavault.sources._export import DiskExport, remove_backup_leftovers
from stratavault.sources._flr import FlrEvent, flr_lookup, flr_read, flr_walk
from stratavault.sources._flr_fs import FILESYSTEMS, FlrEntry, FlrFilesystem, open_filesystem
from stratavault.sources._flr_volumes import FlrVolume, list_volumes
from stratavault.sources._guest_agent import GuestAgent
from stratavault.sources._image_export import IMAGE_FORMATS, ImageExport, ImageServer
from stratavault.sources._libvirt import DEFAULT_LIBVIRT_URI, DomainDisk, LibvirtDomain
from stratavault.sources._libvirt_backup import LibvirtBackup, remove_libvirt_backup_leftovers
from stratavault.sources._qmp import QmpSession
from stratavault.sources._raw_disk import (
    RawDiskSource,
    RawDiskTarget,
    convert_image,
    probe_image_format,
)
from stratavault.sources._read import (
    DEFAULT_READ_BUFFER_BYTES,
    FileChangedError,
    SparseFileReader,
    prefetch_files,
    prefetch_metadata,
    read_file_extents,
)
from stratavault.sources._restore import ZEROS, FsRestorer, RestoreFile, RestoreIssue
from stratavault.sources._safe_dirs import RelPath, check_name
from stratavault.sources._vm import DirtyBitmap, VmDisk, list_vm_disks, vm_config
from stratavault.sources._vm_backup import Consistency, VmBackup, find_guest_agent_socket
from stratavault.sources._walk import ErrorHandler, read_xattrs, walk

__all__ = [
    "DEFAULT_BITMAP_PREFIX",
    "DEFAULT_LIBVIRT_URI",
    "DEFAULT_READ_BUFFER_BYTES",
    "FILESYSTEMS",
    "IMAGE_FORMATS",
    "ZEROS",
    "Consistency",
    "DirtyBitmap",
    "DiskExport",
    "DomainDisk",
    "EntryMetadata",
    "EntryType",
    "ErrorHandler",
    "ExcludeMatcher",
    "FileChangedError",
    "FileStamp",
    "FlrEntry",
    "FlrEvent",
    "FlrFilesystem",
    "FlrVolume",
    "FsEntry",
    "FsRestorer",
    "GuestAgent",
    "ImageExport",
    "ImageServer",
    "LibvirtBackup",
    "LibvirtDomain",
    "OwnerNames",
    "QmpSession",
    "RawDiskSource",
    "RawDiskTarget",
    "RelPath",
    "RestoreFile",
    "RestoreIssue",
    "SparseFileReader",
    "VmBackup",
    "VmDisk",
    "check_name",
    "convert_image",
    "find_guest_agent_socket",
    "flr_lookup",
    "flr_read",
    "flr_walk",
    "list_vm_disks",
    "list_volumes",
    "open_filesystem",
    "prefetch_files",
    "prefetch_metadata",
    "probe_image_format",
    "read_exclude_file",
    "read_file_extents",
    "read_xattrs",
    "remove_backup_leftovers",
    "remove_libvirt_backup_leftovers",
    "same_file_stat",
    "vm_config",
    "walk",
]
