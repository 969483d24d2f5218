"""Backup of a libvirt domain: pull-mode ``backupBegin`` with checkpoints, or its stopped disks.

Checkpoint naming: the backup that starts at point in time *n* creates the
libvirt checkpoint ``<prefix>-<n>`` (``stratavault-7``, the same
``DEFAULT_BITMAP_PREFIX`` as the QMP bitmap chain; libvirt names the QEMU bitmaps
after the checkpoint). Unlike the QMP chain's bitmaps, checkpoints carry no random
token: they belong to one domain (libvirt keeps them with it, by its UUID), so one
of another disk cannot be met. The snapshot records it per disk
(:attr:`DiskExport.new_bitmap`), and the next backup passes it back in
``expected_bitmaps``: that disk is then exported incrementally, with the blocks
changed since that checkpoint. On success every older checkpoint of ours is
deleted; on failure the new one is, so the next backup starts again from the
last good one and no change is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from stratavault.errors import SourceError
from stratavault.sources._bitmap_chain import DEFAULT_BITMAP_PREFIX, generation
from stratavault.sources._export import DiskExport
from stratavault.sources._image_export import ImageExport
from stratavault.sources._libvirt import (
    DomainDisk,
    LibvirtDomain,
    libvirt_errors,
    libvirt_module,
)
from stratavault.sources._vm_backup import Consistency, LiveBackup

__all__ = ["LibvirtBackup", "remove_libvirt_backup_leftovers"]

_MAX_UNIX_PATH = 107
_JOB_OPERATION_BACKUP = 9  # VIR_DOMAIN_JOB_OPERATION_BACKUP
_JOB_END_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Plan:
    disk: DomainDisk
    incremental: str | None
    """Checkpoint to export the changes since; None: full."""
    checkpointed: bool
    """Whether the new checkpoint tracks this disk (qcow2, writable)."""
    full_read_reason: str | None


def _quoteattr(value: str) -> str:
    """An XML attribute value with its quotes (xml.sax.saxutils loads urllib: only when used)."""
    from xml.sax.saxutils import quoteattr as quote

    return quote(value)


class LibvirtBackup(LiveBackup):
    """A backup of every disk of a libvirt domain, as a context manager.

    Running (or paused) domain: entering starts one pull-mode libvirt backup job
    for all disks at one point in time, creates the new checkpoint with it and
    serves the disks over NBD on a unix socket in ``scratch_dir`` (:attr:`exports`,
    the same :class:`DiskExport` as :class:`VmBackup`). The guest's file systems
    are frozen through libvirt's guest agent around it when ``quiesce`` and the
    domain has an agent channel. Leaving always aborts the job; normally the older
    checkpoints of the chain are deleted, when the block raised the new one is.
    A checkpoint that QEMU lost (unclean exit) is reported and replaced by a full
    read and a fresh chain.

    Shut-off domain: each disk image is served through :class:`ImageExport`,
    read in full; the checkpoint chain is left as it is and continues when the
    domain runs again.

    ``scratch_dir`` must be writable by the QEMU process (the libvirt-qemu user
    under a default libvirt), which creates the NBD socket and scratch images there.
    """

    def __init__(
        self,
        domain: LibvirtDomain,
        scratch_dir: str | os.PathLike[str],
        *,
        expected_bitmaps: Mapping[str, str] | None = None,
        checkpoint_prefix: str = DEFAULT_BITMAP_PREFIX,
        quiesce: bool = True,
    ) -> None:
        super().__init__(scratch_dir, expected_bitmaps)
        self.domain = domain
        self.checkpoint_prefix = checkpoint_prefix
        self.quiesce = quiesce
        self.checkpoint: str | None = None
        """The checkpoint this backup created (None: none, e.g. a stopped domain)."""
        self.removed_checkpoints: list[str] = []
        """Unusable checkpoints this backup deleted before falling back to a full read."""
        self.socket_path = self.scratch_dir / "nbd.sock"
        self._token = secrets.token_hex(3)
        self._job_started = False
        self._images: contextlib.ExitStack | None = None
        self._plans: list[_Plan] = []

    def __enter__(self) -> LibvirtBackup:
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.config = self.domain.config()
        disks = self.domain.disks()
        if not disks:
            raise SourceError(f"{self.domain.what('starting a backup')} - no disks")
        if not self.domain.is_active():
            self._enter_stopped(disks)
            return self
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
            raise SourceError(
                f"preparing the NBD socket {self.socket_path} - path longer than"
                f" {_MAX_UNIX_PATH} bytes; use a shorter scratch folder"
            )
        try:
            self._begin(disks)
            self.exports = self._read_exports(disks)
        except BaseException as exc:
            for error in self._release(success=False):
                exc.add_note(f"also during teardown: {error}")
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors = self._release(success=exc is None)
        if not errors:
            return
        if exc is not None:
            for error in errors:
                exc.add_note(f"also during teardown: {error}")
            return
        raise SourceError(f"{self.domain.what('tearing down the backup')} - " + "; ".join(errors))

    # -- running domain ------------------------------------------------------------------------

    def _begin(self, disks: Sequence[DomainDisk]) -> None:
        libvirt = libvirt_module()
        if _backup_job_running(self.domain):
            raise SourceError(
                f"{self.domain.what('starting a backup')} - a backup job is already running:"
                " another backup of this domain, or one that died and left its job"
                " (remove_libvirt_backup_leftovers)"
            )
        checkpoints = self._own_checkpoints()
        plans = [self._plan(d, checkpoints) for d in disks]
        name = self._new_checkpoint_name(checkpoints)
        try:
            self._start_job(plans, name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT:
                raise self._error("starting the backup job", exc) from exc
            # QEMU lost or broke a bitmap (unclean exit): the whole chain is suspect.
            reason = (
                f"checkpoint bitmaps are unusable (QEMU exited uncleanly):"
                f" {exc.get_error_message()}; removed, a new chain starts"
            )
            self._remove_checkpoints(sorted(checkpoints))
            plans = [
                dataclasses.replace(p, incremental=None, full_read_reason=reason)
                if p.incremental else p
                for p in plans
            ]  # fmt: skip
            try:
                self._start_job(plans, name)
            except libvirt.libvirtError as again:
                raise self._error("starting the backup job with full reads", again) from again
        self._plans = list(plans)

    def _plan(self, disk: DomainDisk, checkpoints: Mapping[str, set[str]]) -> _Plan:
        checkpointed = disk.format == "qcow2" and not disk.read_only
        if not checkpointed:
            kind = "read-only disk" if disk.read_only else f"{disk.format} disk"
            return _Plan(disk, None, False, f"{kind}: libvirt checkpoints need qcow2; full read")
        expected = self.expected_bitmaps.get(disk.device)
        if expected is None:
            return _Plan(disk, None, True, "first backup of this disk: no checkpoint yet")
        if expected not in checkpoints:
            return _Plan(disk, None, True, (
                f"checkpoint {expected} expected by the previous snapshot is missing"
                " (deleted, or the domain was redefined); a new chain starts"
            ))  # fmt: skip
        if disk.device not in checkpoints[expected]:
            return _Plan(disk, None, True, f"disk is not part of checkpoint {expected}")
        return _Plan(disk, expected, True, None)

    def _new_checkpoint_name(self, checkpoints: Mapping[str, set[str]]) -> str:
        prefix = self.checkpoint_prefix
        names = [*checkpoints, *self.expected_bitmaps.values()]
        last = max([generation(n, prefix) or 0 for n in names] + [0])
        return f"{prefix}-{last + 1}"

    def _start_job(self, plans: Sequence[_Plan], name: str) -> None:
        """One ``backupBegin`` (with the new checkpoint), the guest frozen around it."""
        backup_xml = self._backup_xml(plans)
        tracked = [p.disk.device for p in plans if p.checkpointed]
        checkpoint_xml = _checkpoint_xml(name, [p.disk.device for p in plans], tracked)
        thaw = self._freeze()
        try:
            self.domain.domain.backupBegin(backup_xml, checkpoint_xml, 0)
            self._job_started = True  # from here on, teardown aborts the job
            self.checkpoint = name if checkpoint_xml else None
        finally:
            thaw()

    def _backup_xml(self, plans: Sequence[_Plan]) -> str:
        disks = []
        for i, plan in enumerate(plans):
            mode = "backupmode='full'"
            if plan.incremental:
                mode = f"backupmode='incremental' incremental={_quoteattr(plan.incremental)}"
            scratch = self.scratch_dir / f"scratch-{i}-{self._token}.qcow2"
            disks.append(
                f"<disk name={_quoteattr(plan.disk.device)} backup='yes' type='file' {mode}>"
                f"<driver type='qcow2'/><scratch file={_quoteattr(os.fspath(scratch))}/></disk>"
            )
        return (
            "<domainbackup mode='pull'>"
            f"<server transport='unix' socket={_quoteattr(os.fspath(self.socket_path))}/>"
            f"<disks>{''.join(disks)}</disks></domainbackup>"
        )

    def _read_exports(self, disks: Sequence[DomainDisk]) -> list[DiskExport]:
        """The exports libvirt set up, from the running job's backup XML."""
        with self._errors("reading the backup job"):
            root = ET.fromstring(self.domain.domain.backupGetXMLDesc(0))
        served = {e.get("name"): e for e in root.iterfind("./disks/disk")}
        by_device = {p.disk.device: p for p in self._plans}
        exports = []
        for disk in disks:
            element = served.get(disk.device)
            if element is None or element.get("backup") != "yes":
                raise SourceError(
                    f"{self.domain.what('starting the backup')} - libvirt does not serve"
                    f" disk {disk.device}"
                )
            plan = by_device[disk.device]
            bitmap = element.get("exportbitmap")
            exports.append(
                DiskExport(
                    device=disk.device,
                    node_name=disk.node_name,
                    size_bytes=disk.size_bytes,
                    socket_path=self.socket_path,
                    export_name=element.get("exportname") or disk.device,
                    bitmap_context=f"qemu:dirty-bitmap:{bitmap}" if bitmap else None,
                    new_bitmap=self.checkpoint if plan.checkpointed else None,
                    full_read_reason=None if bitmap else plan.full_read_reason,
                )
            )
        return exports

    # -- quiescing -----------------------------------------------------------------------------

    def _freeze(self) -> Callable[[], None]:
        """Freeze the guest's file systems if possible; returns the matching thaw."""
        if not self.quiesce:
            self.consistency_detail = "quiescing not asked for"
            return lambda: None
        if not self.domain.has_guest_agent():
            self.consistency_detail = "no agent"
            return lambda: None
        libvirt = libvirt_module()
        frozen_at = time.monotonic()
        try:
            count = self.domain.domain.fsFreeze()
        except libvirt.libvirtError as exc:
            self.consistency = Consistency.CRASH
            self.consistency_detail = f"fsfreeze failed: {exc.get_error_message()}"
            return lambda: None
        self.consistency = Consistency.APPLICATION
        self.consistency_detail = "fs frozen" if count else "fs frozen (no file systems)"

        def thaw() -> None:
            errors = []
            for _ in range(3):
                try:
                    self.domain.domain.fsThaw()
                    self.frozen_s = time.monotonic() - frozen_at
                    return
                except libvirt.libvirtError as exc:
                    errors.append(str(exc.get_error_message()))
            raise SourceError(
                f"{self.domain.what('thawing the guest file systems')} - {errors[-1]};"
                " the guest may still be frozen"
            )

        return thaw

    # -- stopped domain ------------------------------------------------------------------------

    def _enter_stopped(self, disks: Sequence[DomainDisk]) -> None:
        checkpoints = self._own_checkpoints()
        stack = contextlib.ExitStack()
        try:
            for i, disk in enumerate(disks):
                if disk.source_type != "file":
                    raise SourceError(
                        f"{self.domain.what('backing up the shut-off domain')} - disk"
                        f" {disk.device} is a block device; only image files are supported"
                    )
                image = ImageExport(
                    disk.source, self.scratch_dir / f"img{i}", fmt=disk.format,
                    track_changes=False,
                )  # fmt: skip
                stack.enter_context(image)
                assert image.export is not None
                expected = self.expected_bitmaps.get(disk.device)
                keep = expected if disk.device in checkpoints.get(expected or "", set()) else None
                self.exports.append(
                    dataclasses.replace(
                        image.export,
                        device=disk.device,
                        new_bitmap=keep,
                        full_read_reason="domain is shut off: disk image read in full",
                    )
                )
        except BaseException:
            stack.close()
            raise
        self.consistency_detail = "domain shut off"
        self._images = stack

    # -- checkpoints and teardown --------------------------------------------------------------

    def _own_checkpoints(self) -> dict[str, set[str]]:
        """Checkpoints of this chain (``<prefix>-<n>``) -> the disks each one tracks."""
        libvirt = libvirt_module()
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
        found: dict[str, set[str]] = {}
        with self._errors("listing the checkpoints"):
            for checkpoint in self.domain.domain.listAllCheckpoints(0):
                name = checkpoint.getName()
                if generation(name, self.checkpoint_prefix) is None:
                    continue
                root = ET.fromstring(checkpoint.getXMLDesc(flags))
                found[name] = {
                    str(d.get("name"))
                    for d in root.iterfind("./disks/disk")
                    if d.get("checkpoint") == "bitmap"
                }
        return found

    def _remove_checkpoints(self, names: Sequence[str]) -> None:
        """Delete checkpoints; when libvirt cannot drop a broken bitmap, the metadata only."""
        libvirt = libvirt_module()
        for name in names:
            with self._errors(f"deleting the checkpoint {name}"):
                checkpoint = self.domain.domain.checkpointLookupByName(name, 0)
                try:
                    checkpoint.delete(0)
                except libvirt.libvirtError:
                    checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            self.removed_checkpoints.append(name)

    def _release(self, *, success: bool) -> list[str]:
        """End the job and settle the checkpoints; every step is tried. Returns failures."""
        errors: list[str] = []
        images, self._images = self._images, None
        if images is not None:
            self._try(errors, images.close)
            for folder in self.scratch_dir.glob("img[0-9]*"):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # ImageExport leaves its emptied folder
            return errors
        if self._job_started:
            self._job_started = False
            self._try(errors, lambda: _abort_job(self.domain))
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
        for leftover in self.scratch_dir.glob(f"scratch-*-{self._token}.qcow2"):
            leftover.unlink(missing_ok=True)
        if self.checkpoint is None:
            return errors
        own = self._try(errors, self._own_checkpoints) or {}
        if success:
            drop = sorted(n for n in own if n != self.checkpoint)
        else:
            drop = [self.checkpoint] if self.checkpoint in own else []
            self.checkpoint = None
        self._try(errors, lambda: self._remove_checkpoints(drop))
        return errors

    @staticmethod
    def _try(errors: list[str], step: Callable[[], Any]) -> Any:
        try:
            return step()
        except SourceError as exc:
            errors.append(str(exc))
            return None

    def _errors(self, operation: str) -> contextlib.AbstractContextManager[None]:
        return libvirt_errors(self.domain.what(operation))

    def _error(self, operation: str, exc: Any) -> SourceError:
        return SourceError(f"{self.domain.what(operation)} - {exc.get_error_message()}")


def _checkpoint_xml(name: str, devices: Sequence[str], tracked: Sequence[str]) -> str | None:
    """The new checkpoint's XML (None when no disk can carry one)."""
    if not tracked:
        return None
    disks = "".join(
        f"<disk name={_quoteattr(d)} checkpoint={_quoteattr('bitmap' if d in tracked else 'no')}/>"
        for d in devices
    )
    return (
        f"<domaincheckpoint><name>{name}</name>"
        "<description>Stratavault backup</description>"
        f"<disks>{disks}</disks></domaincheckpoint>"
    )


def remove_libvirt_backup_leftovers(domain: LibvirtDomain) -> list[str]:
    """Abort a backup job that a dead backup process left running; returns what was done.

    The checkpoint such a backup created is deleted by the next successful backup
    (older-than-new checkpoints of the chain are stale). Call it only when no other
    backup of this domain can be running (hold a per-VM lock).
    """
    with contextlib.suppress(SourceError):
        if not domain.is_active():
            return []
    if not _backup_job_running(domain):
        return []
    _abort_job(domain)
    return ["backup job"]


def _backup_job_running(domain: LibvirtDomain) -> bool:
    with libvirt_errors(domain.what("reading the job")):
        stats = domain.domain.jobStats(0)
    return bool(stats.get("operation") == _JOB_OPERATION_BACKUP)


def _abort_job(domain: LibvirtDomain) -> None:
    """Abort the domain's job and wait until libvirt has ended it."""
    libvirt = libvirt_module()
    with libvirt_errors(domain.what("aborting the backup job")):
        domain.domain.abortJob()
    deadline = time.monotonic() + _JOB_END_TIMEOUT_S
    while True:
        try:
            if domain.domain.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return
        except libvirt.libvirtError:
            return  # the domain is gone, and its job with it
        if time.monotonic() > deadline:
            raise SourceError(
                f"{domain.what('aborting the backup job')} - still running after"
                f" {_JOB_END_TIMEOUT_S:.0f} s"
            )
        time.sleep(0.01)
