"""Use case: back up a running QEMU VM (every disk at one point in time, incremental from
its dirty bitmaps), and disk images of any format qemu-storage-daemon reads."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stratavault._defaults import DEFAULT_DISK_FRAME_BYTES, IMAGE_FORMATS
from stratavault.errors import UsageError
from stratavault.jobs._backup_disk import (
    DEFAULT_DISK_CHUNK_BYTES,
    DISK_KINDS,
    BackupDisksOptions,
    DiskSource,
    backup_disks,
)
from stratavault.jobs._nbd_source import NbdDiskSource
from stratavault.jobs._progress import Cancellation, Progress
from stratavault.repo import Repository
from stratavault.snapshot import Snapshot, find_snapshot, latest, load_snapshots
from stratavault.sources import (
    DEFAULT_LIBVIRT_URI,
    ImageExport,
    LibvirtBackup,
    LibvirtDomain,
    QmpSession,
    RawDiskSource,
    VmBackup,
    probe_image,
)

__all__ = ["BackupVmOptions", "backup_images", "backup_vm"]


@dataclass(frozen=True, slots=True)
class BackupVmOptions:
    """Which VM and how: a QEMU process through its QMP socket, or a libvirt domain."""

    qmp_socket: Path | None = None
    libvirt_domain: str = ""
    """A libvirt domain's name or UUID (instead of ``qmp_socket``)."""
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    name: str = ""
    """The VM's name in the snapshot (its paths); default: QEMU's ``-name`` or the domain's
    name, else the socket's file name."""
    guest_agent_socket: Path | None = None
    """The guest agent's socket; default: found among the VM's chardevs."""
    tags: tuple[str, ...] = ()
    host: str = field(default_factory=socket.gethostname)
    chunk_bytes: int = DEFAULT_DISK_CHUNK_BYTES
    frame_bytes: int = DEFAULT_DISK_FRAME_BYTES
    compression_level: int = 3
    workers: int = 0
    scratch_dir: Path | None = None
    """Where the fleecing overlays and the NBD socket go (default: a temporary folder)."""


def _parent(repo: Repository, host: str, paths: list[str]) -> Snapshot | None:
    """The latest complete disk snapshot of the same host and paths (damaged ones skipped)."""
    snaps = [
        s
        for s in load_snapshots(repo, damaged=[])
        if s.kind in DISK_KINDS and s.host == host and sorted(s.paths) == sorted(paths)
    ]
    return latest(snaps) if snaps else None


@contextlib.contextmanager
def _scratch(given: Path | None) -> Any:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="stratavault-") as tmp:
        yield Path(tmp)


def _vm_name(session: QmpSession, options: BackupVmOptions) -> str:
    if options.name:
        return options.name
    with contextlib.suppress(Exception):
        name = session.execute("query-name").get("name")
        if name:
            return str(name)
    assert options.qmp_socket is not None
    return options.qmp_socket.stem


@contextlib.contextmanager
def _live_backup(
    repo: Repository, options: BackupVmOptions, scratch: Path
) -> Iterator[tuple[str, Snapshot | None, VmBackup | LibvirtBackup]]:
    """Open the VM (QMP or libvirt), pick the parent, start the backup session; yield
    ``(name, parent, session)``. Leaving with an exception merges the bitmaps back."""
    if bool(options.libvirt_domain) == (options.qmp_socket is not None):
        raise UsageError("backup vm: give either a QMP socket or a libvirt domain")
    if options.libvirt_domain:
        with LibvirtDomain(options.libvirt_domain, uri=options.libvirt_uri) as domain:
            name = options.name or domain.name
            parent = _parent(repo, options.host, [name])
            with LibvirtBackup(domain, scratch, expected_bitmaps=_chain(parent)) as lv:
                yield name, parent, lv
        return
    assert options.qmp_socket is not None
    with QmpSession(options.qmp_socket) as session:
        name = _vm_name(session, options)
        parent = _parent(repo, options.host, [name])
        vm = VmBackup(
            session, scratch, expected_bitmaps=_chain(parent),
            guest_agent_socket=options.guest_agent_socket,
        )  # fmt: skip
        with vm:
            yield name, parent, vm


def _chain(parent: Snapshot | None) -> dict[str, str]:
    """The bitmap (checkpoint) each disk of the parent snapshot recorded."""
    return {d.name: d.bitmap for d in parent.disks if d.bitmap} if parent else {}


def backup_vm(
    repo: Repository,
    options: BackupVmOptions,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Snapshot:
    """Back up every disk of a running VM (QEMU over QMP, or a libvirt domain) into one
    snapshot.

    The guest's file systems are frozen around the point in time when a guest agent
    answers; the disks are read from exports of that point while the guest keeps running.
    Only what the dirty bitmaps mark is read when the parent snapshot's chain is intact,
    else everything allocated. On any failure the bitmaps are merged back (libvirt: the new
    checkpoint is dropped), so the next backup still sees every change.
    """
    with (
        _scratch(options.scratch_dir) as scratch,
        _live_backup(repo, options, scratch) as (name, parent, vm),
    ):
        sources = [NbdDiskSource(export) for export in vm.exports]
        config = {
            **vm.config,
            "consistency": vm.consistency_text,
            "frozen_s": vm.frozen_s,
            "full_read": {e.device: e.full_read_reason for e in vm.exports},
        }
        disk_options = BackupDisksOptions(
            tags=options.tags, host=options.host, paths=(name,), kind="vm",
            parent=parent.id if parent else None, chunk_bytes=options.chunk_bytes,
            frame_bytes=options.frame_bytes,
            compression_level=options.compression_level, workers=options.workers,
            vm_config=config,
        )  # fmt: skip
        try:
            return backup_disks(
                repo, sources, disk_options, progress=progress, cancel=cancel, clock=clock
            )
        finally:
            for source in sources:
                source.close()


def _probed_format(image: Path) -> str:
    """The probed format of an image that names no other file; ``UsageError`` for one that
    does (a backing file, vmdk extents): the file's own header decides what is read, and
    a guest can write any header into its raw disk, so the caller must say the format."""
    info = probe_image(image)
    if info.format != "raw" and info.references:
        raise UsageError(
            f"image {image} reads as {info.format} naming {', '.join(info.references)}: "
            f"give --format {info.format} to back it up with the files it names, or "
            "--format raw for its own bytes (a guest can write such a header into a raw disk)"
        )
    return info.format


def backup_images(
    repo: Repository,
    images: Sequence[Path],
    options: BackupDisksOptions,
    *,
    names: Sequence[str] = (),
    image_format: str | None = None,
    scratch_dir: Path | None = None,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> Snapshot:
    """Back up disk images (raw files and block devices read directly; qcow2, vmdk, vhdx,
    vdi and others through qemu-storage-daemon) into one snapshot; ``names`` names the
    disks (default: the file names). A qcow2 keeps a persistent dirty bitmap, so its next
    backup reads only what changed.

    ``image_format`` is the format of every image; ``None`` asks ``qemu-img`` (block
    devices: raw). Give it for an image a guest wrote: a raw disk that starts with another
    format's header would be probed as that format, its backing file (a path the guest
    chose) opened and backed up."""
    if names and len(names) != len(images):
        raise UsageError(f"{len(names)} names given for {len(images)} images")
    if image_format is not None and image_format not in IMAGE_FORMATS:
        raise UsageError(f"image format {image_format!r}: expected one of {IMAGE_FORMATS}")
    paths = options.paths or tuple(str(Path(i).absolute()) for i in images)
    if options.parent is None:
        parent = _parent(repo, options.host, list(paths))
    else:
        parent = find_snapshot(repo, options.parent)
    recorded = {d.path: d.bitmap for d in parent.disks if d.bitmap} if parent else {}
    if parent is not None:
        options = replace(options, parent=parent.id)
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(_scratch(scratch_dir))
        sources = [
            _image_source(
                stack,
                Path(image),
                names[number] if names else Path(image).name,
                image_format,
                scratch / f"image{number}",
                recorded.get(str(Path(image).absolute())),
            )
            for number, image in enumerate(images)
        ]
        return backup_disks(
            repo, sources, replace(options, paths=paths), progress=progress, cancel=cancel
        )


def _image_source(
    stack: contextlib.ExitStack,
    image: Path,
    name: str,
    image_format: str | None,
    scratch: Path,
    bitmap: str | None,
) -> DiskSource:
    """The source of one image, closed with ``stack``: a raw file or device read directly,
    another format through a private qemu-storage-daemon (``bitmap``: the one the parent
    snapshot recorded for it)."""
    fmt = image_format or ("raw" if image.is_block_device() else _probed_format(image))
    if fmt == "raw":
        raw = RawDiskSource(image, name=name)
        stack.callback(raw.close)
        return raw
    export = stack.enter_context(ImageExport(image, scratch, fmt=fmt, expected_bitmap=bitmap))
    assert export.export is not None
    source = NbdDiskSource(export.export)
    source.name = name
    source.path = str(image.absolute())
    stack.callback(source.close)
    return source
