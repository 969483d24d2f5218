"""Point-in-time NBD exports of block nodes with their frozen dirty bitmaps.

One :class:`ExportSession` serves both a running VM (image fleecing) and
qemu-storage-daemon (a stopped image, exported as is). The QMP sequence::

    [remove unusable chain bitmaps; merge back an interrupted backup]
    blockdev-add fleece overlays (qcow2, backing = the disk's format node)
    [before_transaction(): guest fsfreeze]
    transaction { per disk: bitmap-add <new>, bitmap-disable <frozen>,
                  blockdev-backup sync=none -> overlay }
    [after_transaction(): guest thaw]
    nbd-server-start unix:<scratch>/nbd.sock ; block-export-add per disk
    ... the caller reads ...
    block-export-del (hard) ; nbd-server-stop ; block-job-cancel ; blockdev-del
    success: bitmap-remove <frozen>     failure: merge <new> into <frozen>, enable, remove <new>
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratavault.errors import SourceError
from stratavault.sources._bitmap_chain import BitmapPlan, plan_bitmaps
from stratavault.sources._qmp import QmpSession
from stratavault.sources._vm import VmDisk

__all__ = ["DiskExport", "ExportSession", "remove_backup_leftovers"]

_MAX_UNIX_PATH = 107
_EVENT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DiskExport:
    """One disk of a backup, served read-only over NBD at the backup's point in time."""

    device: str
    """The guest device id (``vda``) or node name."""
    node_name: str
    """The disk's format node in QEMU."""
    size_bytes: int
    socket_path: Path
    """Unix socket of the NBD server."""
    export_name: str
    bitmap_context: str | None
    """NBD meta context with the blocks changed since the parent snapshot
    (``qemu:dirty-bitmap:NAME``), or None: read every allocated extent."""
    new_bitmap: str | None
    """Name of the bitmap that tracks changes since this backup: record it in the snapshot."""
    full_read_reason: str | None
    """Why there is no usable bitmap (first backup, missing, inconsistent...)."""

    @property
    def uri(self) -> str:
        """The export as an NBD URI (``nbd+unix:///NAME?socket=PATH``)."""
        return f"nbd+unix:///{self.export_name}?socket={self.socket_path}"


@dataclass
class _Disk:
    disk: VmDisk
    plan: BitmapPlan
    export_name: str
    overlay: Path | None = None
    fleece_node: str | None = None
    job_id: str | None = None
    export_id: str | None = None


class ExportSession:
    """Freeze, export and afterwards release the disks of one QEMU process.

    ``fleece=True`` (running VM) serves a fleecing overlay that keeps the old data
    while the guest writes; ``fleece=False`` (qemu-storage-daemon, nothing else
    writes) exports the format nodes themselves.
    """

    def __init__(
        self,
        session: QmpSession,
        disks: Sequence[VmDisk],
        scratch_dir: Path,
        *,
        expected_bitmaps: Mapping[str, str],
        bitmap_prefix: str,
        fleece: bool,
    ) -> None:
        self.session = session
        self.scratch_dir = scratch_dir
        self.fleece = fleece
        self.socket_path = scratch_dir / "nbd.sock"
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
            raise SourceError(
                f"preparing the NBD socket {self.socket_path} - path longer than"
                f" {_MAX_UNIX_PATH} bytes; use a shorter scratch folder"
            )
        token = secrets.token_hex(3)
        self._token = token
        self._disks = [
            _Disk(d, plan_bitmaps(d, expected_bitmaps.get(d.device), bitmap_prefix),
                  _export_name(d.device, i))
            for i, d in enumerate(disks)
        ]  # fmt: skip
        self._server_started = False
        self._rotated = False
        self.exports: list[DiskExport] = []

    # -- start ---------------------------------------------------------------------------------

    def start(
        self,
        before_transaction: Callable[[], None] = lambda: None,
        after_transaction: Callable[[], None] = lambda: None,
    ) -> None:
        """Rotate bitmaps and freeze the point in time in one transaction, then export.

        On failure everything created so far is released again (bitmaps untouched).
        """
        try:
            self._prepare_bitmaps()
            if self.fleece:
                self._add_overlays()
            actions = [a for d in self._disks for a in self._actions(d)]
            before_transaction()
            try:
                self.session.execute("transaction", {"actions": actions})
            finally:
                after_transaction()
            self._rotated = True
            self._export_all()
        except BaseException as exc:
            for note in self.release(success=False):
                exc.add_note(note)
            raise

    def _prepare_bitmaps(self) -> None:
        for d in self._disks:
            node = d.disk.node_name
            if d.plan.recover_from and d.plan.frozen:
                self._merge_back(node, d.plan.recover_from, d.plan.frozen)
            for name in d.plan.remove_first:
                self.session.execute("block-dirty-bitmap-remove", {"node": node, "name": name})

    def _add_overlays(self) -> None:
        for i, d in enumerate(self._disks):
            overlay = self.scratch_dir / f"fleece-{i}-{self._token}.qcow2"
            _create_overlay(overlay, d.disk.virtual_size_bytes)
            d.overlay = overlay
            node = f"sv-fl{i}-{self._token}"
            self.session.execute(
                "blockdev-add",
                {
                    "driver": "qcow2", "node-name": node, "backing": d.disk.node_name,
                    "file": {"driver": "file", "filename": os.fspath(overlay)},
                },
            )  # fmt: skip
            d.fleece_node = node

    def _actions(self, d: _Disk) -> list[dict[str, Any]]:
        node = d.disk.node_name
        actions: list[dict[str, Any]] = []
        if d.plan.new:
            data = {"node": node, "name": d.plan.new, "persistent": d.plan.persistent}
            actions.append({"type": "block-dirty-bitmap-add", "data": data})
        if d.plan.frozen:
            data = {"node": node, "name": d.plan.frozen}
            actions.append({"type": "block-dirty-bitmap-disable", "data": data})
        if d.fleece_node:
            d.job_id = f"sv-job{self._disks.index(d)}-{self._token}"
            data = {"job-id": d.job_id, "device": node, "target": d.fleece_node, "sync": "none"}
            actions.append({"type": "blockdev-backup", "data": data})
        return actions

    def _export_all(self) -> None:
        addr = {"type": "unix", "data": {"path": os.fspath(self.socket_path)}}
        self.session.execute("nbd-server-start", {"addr": addr})
        self._server_started = True
        for i, d in enumerate(self._disks):
            export_id = f"sv-exp{i}-{self._token}"
            args: dict[str, Any] = {
                "type": "nbd", "id": export_id, "node-name": d.fleece_node or d.disk.node_name,
                "name": d.export_name, "writable": False,
            }  # fmt: skip
            if d.plan.frozen:
                args["bitmaps"] = [{"node": d.disk.node_name, "name": d.plan.frozen}]
            self.session.execute("block-export-add", args)
            d.export_id = export_id
            self.exports.append(
                DiskExport(
                    device=d.disk.device,
                    node_name=d.disk.node_name,
                    size_bytes=d.disk.virtual_size_bytes,
                    socket_path=self.socket_path,
                    export_name=d.export_name,
                    bitmap_context=f"qemu:dirty-bitmap:{d.plan.frozen}" if d.plan.frozen else None,
                    new_bitmap=d.plan.new,
                    full_read_reason=d.plan.full_read_reason,
                )
            )

    # -- release -------------------------------------------------------------------------------

    def release(self, *, success: bool) -> list[str]:
        """Tear everything down; every step is tried. Returns the failures, as messages.

        ``success`` decides the frozen bitmaps' fate: dropped, or merged back.
        """
        errors: list[str] = []

        def attempt(step: Callable[[], object]) -> None:
            try:
                step()
            except (SourceError, OSError) as exc:
                errors.append(str(exc))

        for d in self._disks:
            if d.export_id:
                attempt(functools.partial(self._del_export, d))
        if self._server_started:
            attempt(lambda: self.session.execute("nbd-server-stop"))
            self._server_started = False
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        for d in self._disks:
            if d.job_id and self._rotated:
                attempt(functools.partial(self._cancel_job, d))
            if d.fleece_node:
                attempt(functools.partial(self._del_node, d))
            if d.overlay:
                attempt(d.overlay.unlink)
                d.overlay = None
            if self._rotated:
                attempt(functools.partial(self._finish_bitmaps, d, success))
        self._rotated = False
        return errors

    def _del_export(self, d: _Disk) -> None:
        export_id, d.export_id = d.export_id, None
        self.session.execute("block-export-del", {"id": export_id, "mode": "hard"})
        self.session.wait_event(
            "BLOCK_EXPORT_DELETED", match={"id": export_id}, timeout_s=_EVENT_TIMEOUT_S
        )

    def _cancel_job(self, d: _Disk) -> None:
        job_id, d.job_id = d.job_id, None
        jobs = {j["device"] for j in self.session.execute("query-block-jobs")}
        if job_id not in jobs:
            return  # ended by itself (an error on the overlay); nothing to cancel
        self.session.execute("block-job-cancel", {"device": job_id, "force": True})
        self.session.wait_event(
            "BLOCK_JOB_CANCELLED", match={"device": job_id}, timeout_s=_EVENT_TIMEOUT_S
        )

    def _del_node(self, d: _Disk) -> None:
        node, d.fleece_node = d.fleece_node, None
        self.session.execute("blockdev-del", {"node-name": node})

    def _finish_bitmaps(self, d: _Disk, success: bool) -> None:
        node, frozen, new = d.disk.node_name, d.plan.frozen, d.plan.new
        if success:
            if frozen:
                self.session.execute("block-dirty-bitmap-remove", {"node": node, "name": frozen})
        elif frozen and new:
            self._merge_back(node, new, frozen)
        elif new:
            self.session.execute("block-dirty-bitmap-remove", {"node": node, "name": new})

    def _merge_back(self, node: str, source: str, target: str) -> None:
        """Merge ``source`` into the disabled ``target``, enable ``target``, drop ``source``."""
        actions = [
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": node, "target": target, "bitmaps": [source]}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": target}},
        ]  # fmt: skip
        self.session.execute("transaction", {"actions": actions})
        self.session.execute("block-dirty-bitmap-remove", {"node": node, "name": source})


def remove_backup_leftovers(session: QmpSession, scratch_dir: Path | None = None) -> list[str]:
    """Remove what a backup process that died mid-way left in QEMU; returns what was removed.

    Exports, fleecing jobs and nodes carry Stratavault's names (``sv-exp*``, ``sv-job*``,
    ``sv-fl*``); the NBD server is stopped when it served such exports, and overlays in
    ``scratch_dir`` are deleted. Bitmaps are left to the next backup, which repairs its chain.
    Call it only when no other backup of this VM can be running (hold a per-VM lock).
    """
    removed: list[str] = []
    exports = [e["id"] for e in session.execute("query-block-exports")]
    for export_id in (e for e in exports if e.startswith("sv-exp")):
        session.execute("block-export-del", {"id": export_id, "mode": "hard"})
        session.wait_event("BLOCK_EXPORT_DELETED", match={"id": export_id}, timeout_s=30)
        removed.append(f"export {export_id}")
    if any(e.startswith("sv-exp") for e in exports):
        session.execute("nbd-server-stop")
        removed.append("NBD server")
    for job in session.execute("query-block-jobs"):
        if job["device"].startswith("sv-job"):
            session.execute("block-job-cancel", {"device": job["device"], "force": True})
            session.wait_event("BLOCK_JOB_CANCELLED", match={"device": job["device"]}, timeout_s=30)
            removed.append(f"job {job['device']}")
    for node in session.execute("query-named-block-nodes", {"flat": True}):
        if node["node-name"].startswith("sv-fl"):
            session.execute("blockdev-del", {"node-name": node["node-name"]})
            removed.append(f"node {node['node-name']}")
    for leftover in sorted(scratch_dir.glob("fleece-*.qcow2")) if scratch_dir else []:
        leftover.unlink(missing_ok=True)
        removed.append(f"file {leftover}")
    return removed


def _export_name(device: str, index: int) -> str:
    return device if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", device) else f"disk{index}"


def _create_overlay(path: Path, size_bytes: int) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", os.fspath(path), str(size_bytes)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(f"creating the fleecing overlay {path} - {exc}") from exc
    if result.returncode != 0:
        raise SourceError(
            f"creating the fleecing overlay {path} - {result.stderr.strip() or 'qemu-img failed'}"
        )
