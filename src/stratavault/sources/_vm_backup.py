"""Backup of a running QEMU VM: all disks at one point in time, quiesced when possible."""

from __future__ import annotations

import contextlib
import enum
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from stratavault.errors import SourceError
from stratavault.sources._bitmap_chain import DEFAULT_BITMAP_PREFIX
from stratavault.sources._export import DiskExport, ExportSession
from stratavault.sources._guest_agent import GuestAgent
from stratavault.sources._qmp import QmpSession
from stratavault.sources._vm import list_vm_disks, vm_config

__all__ = ["Consistency", "LiveBackup", "VmBackup", "find_guest_agent_socket"]

_AGENT_PORT_NAME = "org.qemu.guest_agent.0"


class Consistency(enum.StrEnum):
    """How consistent the backup's point in time is."""

    APPLICATION = "application-consistent"
    """The guest's file systems were frozen by the guest agent around the transaction."""
    CRASH = "crash-consistent"
    """As if the power was cut at that instant (no agent, or it did not answer)."""


class LiveBackup:
    """What every live backup session (QMP or libvirt) tells once it has started: the
    exported disks, the configuration and how consistent the point in time is."""

    def __init__(
        self, scratch_dir: str | os.PathLike[str], expected_bitmaps: Mapping[str, str] | None
    ) -> None:
        self.scratch_dir = Path(scratch_dir)
        self.expected_bitmaps = dict(expected_bitmaps or {})
        self.consistency = Consistency.CRASH
        self.consistency_detail = "no agent"
        """Why the point in time has its consistency ("fs frozen", "no agent", a failure)."""
        self.frozen_s: float | None = None
        """How long the guest's file systems stayed frozen (None: they were not)."""
        self.config: dict[str, Any] = {}
        """The VM's configuration, taken at the start."""
        self.exports: list[DiskExport] = []

    @property
    def consistency_text(self) -> str:
        """E.g. "application-consistent (fs frozen)" or "crash-consistent (no agent)"."""
        return f"{self.consistency.value} ({self.consistency_detail})"


class VmBackup(LiveBackup):
    """A live backup of every disk of a running VM, as a context manager.

    Entering rotates the dirty bitmaps and starts image fleecing of all disks in
    one QMP transaction (guest file systems frozen around it when a guest agent
    answers), then exports each disk over NBD (:attr:`exports`). Leaving always
    tears everything down: normally the frozen bitmaps are dropped; when the
    block raised, they are merged back so the next backup still sees every change.

    ``expected_bitmaps`` maps device ids to the chain bitmap the parent snapshot
    recorded (:attr:`DiskExport.new_bitmap` of the previous backup). The guest
    agent is used at ``guest_agent_socket``, or found among the VM's chardevs
    when ``find_guest_agent`` is true.
    """

    def __init__(
        self,
        session: QmpSession,
        scratch_dir: str | os.PathLike[str],
        *,
        expected_bitmaps: Mapping[str, str] | None = None,
        bitmap_prefix: str = DEFAULT_BITMAP_PREFIX,
        guest_agent_socket: str | os.PathLike[str] | None = None,
        find_guest_agent: bool = True,
        freeze_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(scratch_dir, expected_bitmaps)
        self.session = session
        self.bitmap_prefix = bitmap_prefix
        self.guest_agent_socket = Path(guest_agent_socket) if guest_agent_socket else None
        self.find_guest_agent = find_guest_agent
        self.freeze_timeout_s = freeze_timeout_s
        self._export: ExportSession | None = None
        self._agent: GuestAgent | None = None
        self._frozen_at: float | None = None

    def __enter__(self) -> VmBackup:
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.config = vm_config(self.session)
        disks = list_vm_disks(self.session)
        if not disks:
            raise SourceError(
                f"starting a backup of the VM at {self.session.socket_path} - no disks"
            )
        export = ExportSession(
            self.session, disks, self.scratch_dir,
            expected_bitmaps=self.expected_bitmaps, bitmap_prefix=self.bitmap_prefix, fleece=True,
        )  # fmt: skip
        agent_path = self.guest_agent_socket
        if agent_path is None and self.find_guest_agent:
            agent_path = find_guest_agent_socket(self.session)
        if agent_path is not None:
            self._connect_agent(agent_path)
        try:
            export.start(self._freeze, self._thaw)
        finally:
            if self._agent is not None:
                self._agent.close()
                self._agent = None
        self._export = export
        self.exports = list(export.exports)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        export, self._export = self._export, None
        if export is None:
            return
        errors = export.release(success=exc is None)
        if not errors:
            return
        if exc is not None:
            for error in errors:
                exc.add_note(f"also during teardown: {error}")
            return
        raise SourceError(
            f"tearing down the backup of the VM at {self.session.socket_path} - "
            + "; ".join(errors)
        )

    # -- quiescing -----------------------------------------------------------------------------

    def _connect_agent(self, path: Path) -> None:
        try:
            self._agent = GuestAgent(path, timeout_s=min(self.freeze_timeout_s, 5.0))
        except SourceError as exc:
            self.consistency_detail = f"guest agent unusable: {exc}"

    def _freeze(self) -> None:
        if self._agent is None:
            return
        try:
            self._frozen_at = time.monotonic()  # a timed-out freeze may still happen: thaw
            count = self._agent.fsfreeze_freeze(timeout_s=self.freeze_timeout_s)
        except SourceError as exc:
            self.consistency_detail = f"fsfreeze failed: {exc}"
            return
        self.consistency = Consistency.APPLICATION
        self.consistency_detail = "fs frozen" if count else "fs frozen (no file systems)"

    def _thaw(self) -> None:
        if self._agent is None or self._frozen_at is None:
            return
        frozen_at, self._frozen_at = self._frozen_at, None
        errors = []
        for _ in range(3):
            try:
                self._agent.fsfreeze_thaw(timeout_s=self.freeze_timeout_s)
                if self.consistency is Consistency.APPLICATION:
                    self.frozen_s = time.monotonic() - frozen_at
                return
            except SourceError as exc:
                errors.append(str(exc))
                with contextlib.suppress(SourceError):
                    self._agent.sync()
        raise SourceError(
            f"thawing the guest file systems of the VM at {self.session.socket_path} - "
            f"{errors[-1]}; the guest may still be frozen"
        )


def find_guest_agent_socket(session: QmpSession) -> Path | None:
    """The host socket of the VM's qemu-guest-agent channel, or None when it has none.

    Looks for a ``virtserialport`` named ``org.qemu.guest_agent.0`` and the unix
    server socket of its chardev.
    """
    labels = set()
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = session.execute("qom-list", {"path": parent})
        except SourceError:
            continue
        for child in children:
            if child.get("type") != "child<virtserialport>":
                continue
            path = f"{parent}/{child['name']}"
            name = session.execute("qom-get", {"path": path, "property": "name"})
            if name == _AGENT_PORT_NAME:
                labels.add(session.execute("qom-get", {"path": path, "property": "chardev"}))
    for chardev in session.execute("query-chardev"):
        if chardev.get("label") not in labels:
            continue
        filename = str(chardev.get("filename", "")).removeprefix("disconnected:")
        if filename.startswith("unix:") and "server=on" in filename:
            return Path(filename.removeprefix("unix:").split(",")[0])
    return None
