"""Use case: back up a running QEMU VM or libvirt domain (every disk at one point in time,
incremental from its dirty bitmaps)."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stratavault._defaults import DEFAULT_DISK_FRAME_BYTES
from stratavault.errors import UsageError
from stratavault.jobs._backup_disk import (
    DEFAULT_DISK_CHUNK_BYTES,
    BackupDisksOptions,
    backup_disks,
    latest_disk_snapshot,
)
from stratavault.jobs._backup_images import scratch_folder
from stratavault.jobs._nbd_source import NbdDiskSource
from stratavault.jobs._progress import Cancellation, Progress
from stratavault.repo import Repository
from stratavault.snapshot import Snapshot
from stratavault.sources import (
    DEFAULT_LIBVIRT_URI,
    LibvirtBackup,
    LibvirtDomain,
    QmpSession,
    VmBackup,
)

__all__ = ["BackupVmOptions", "backup_vm"]


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
            parent = latest_disk_snapshot(repo, options.host, [name])
            with LibvirtBackup(domain, scratch, expected_bitmaps=_chain(parent)) as lv:
                yield name, parent, lv
        return
    assert options.qmp_socket is not None
    with QmpSession(options.qmp_socket) as session:
        name = _vm_name(session, options)
        parent = latest_disk_snapshot(repo, options.host, [name])
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
        scratch_folder(options.scratch_dir) as scratch,
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
