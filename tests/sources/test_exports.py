"""The public face of stratavault.sources."""

from __future__ import annotations

from pathlib import Path

import stratavault.sources as sources
from stratavault.snapshot import Node


def test_exported_members() -> None:
    assert sorted(sources.__all__) == [
        "Consistency",
        "DEFAULT_BITMAP_PREFIX",
        "DEFAULT_LIBVIRT_URI",
        "DEFAULT_READ_BUFFER_BYTES",
        "DirtyBitmap",
        "DiskExport",
        "DomainDisk",
        "EntryMetadata",
        "EntryType",
        "ErrorHandler",
        "ExcludeMatcher",
        "FILESYSTEMS",
        "FileChangedError",
        "FileStamp",
        "FlrEntry",
        "FlrEvent",
        "FlrFilesystem",
        "FlrVolume",
        "FolderDone",
        "FolderStates",
        "FsEntry",
        "FsRestorer",
        "GuestAgent",
        "IMAGE_FORMATS",
        "ImageExport",
        "ImageInfo",
        "ImageServer",
        "KnownFolder",
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
        "StandbyWalker",
        "TreeScan",
        "TreeTotals",
        "VmBackup",
        "VmDisk",
        "WalkRecord",
        "ZEROS",
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
        "probe_image",
        "probe_image_format",
        "read_exclude_file",
        "read_file_extents",
        "read_xattrs",
        "remove_backup_leftovers",
        "remove_libvirt_backup_leftovers",
        "same_file_stat",
        "vm_config",
        "walk",
        "walk_in_process",
        "walk_states_in_process",
    ]
    for name in sources.__all__:
        assert hasattr(sources, name)


def test_snapshot_nodes_serve_as_restore_metadata(tmp_path: Path) -> None:
    """The snapshot's tree node satisfies EntryMetadata, so restore can take it as is."""
    node = Node(name="f", type="file", mode=0o600, size=2, mtime_ns=10**18, xattrs={"user.a": b"1"})
    link = Node(name="l", type="symlink", link_target="f")
    with sources.FsRestorer(tmp_path / "t") as restorer:
        handle = restorer.create_file([node.name], node)
        assert handle is not None
        handle.write_at(0, b"hi")
        restorer.finish_file(handle)
        assert restorer.make_entry([link.name], link)
    assert restorer.issues == []
    assert (tmp_path / "t" / "f").stat().st_mtime_ns == 10**18
    assert (tmp_path / "t" / "l").readlink() == Path("f")
