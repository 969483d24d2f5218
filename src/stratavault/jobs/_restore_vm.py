"""Use case: restore a whole VM (every disk and its configuration), and start it under a
new name from the restored disks."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from stratavault.errors import RestoreError, UsageError
from stratavault.jobs._progress import Cancellation, Progress
from stratavault.jobs._restore_disk import RestoreDiskOptions, RestoreDiskResult, restore_disk
from stratavault.jobs._vm_boot import (
    disk_files,
    original_formats,
    start_qemu,
    vm_command,
    without_network,
)
from stratavault.repo import Repository
from stratavault.snapshot import Snapshot

__all__ = ["RestoreVmOptions", "RestoreVmResult", "restore_vm"]

_STARTABLE_FORMATS = ("raw", "qcow2")


@dataclass(frozen=True, slots=True)
class RestoreVmOptions:
    """Where to restore a VM and whether to start it."""

    target_dir: Path
    format: str | None = None
    """Format of every restored disk; default: each disk's original format when it is raw
    or qcow2, else qcow2."""
    start: bool = False
    no_network: bool = False
    """Start the VM without its network devices (``-nic none``): a copy that must not meet
    the original on the network."""
    name: str = ""
    """Name of the started VM (default: the original name + "-restored")."""
    verify: bool = False


@dataclass(slots=True)
class RestoreVmResult:
    """What was restored and, with ``start``, the running VM."""

    disks: dict[str, Path] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    """Disk -> the format it was restored in (the command line opens it so)."""
    results: list[RestoreDiskResult] = field(default_factory=list)
    config_path: Path | None = None
    command: list[str] | None = None
    """The QEMU command line that starts the VM from the restored disks."""
    pid: int | None = None
    qmp_socket: Path | None = None


def _restore_disks(
    repo: Repository, snapshot: Snapshot, options: RestoreVmOptions,
    progress: Progress | None, cancel: Cancellation | None, result: RestoreVmResult,
) -> None:  # fmt: skip
    for ref in snapshot.disks:
        target, fmt = result.disks[ref.name], result.formats[ref.name]
        disk_options = RestoreDiskOptions(
            target=target, disk=ref.name, format=fmt, verify=options.verify
        )
        result.results.append(
            restore_disk(repo, snapshot, disk_options, progress=progress, cancel=cancel)
        )


def _plan_disks(snapshot: Snapshot, options: RestoreVmOptions, result: RestoreVmResult) -> None:
    """Each disk's format (``--format``, else its original one when QEMU can start it
    from a file, else qcow2) and file (unique in the target folder)."""
    original = original_formats(snapshot.vm_config or {})
    for ref in snapshot.disks:
        was = original.get(ref.name, "raw")
        result.formats[ref.name] = options.format or (was if was in _STARTABLE_FORMATS else "qcow2")
    result.disks.update(disk_files(options.target_dir, result.formats))


def restore_vm(
    repo: Repository,
    snapshot: Snapshot,
    options: RestoreVmOptions,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> RestoreVmResult:
    """Restore every disk of a VM snapshot into ``options.target_dir`` (sparse), write its
    configuration (``vm.json``) and, with ``start``, start QEMU on the restored disks."""
    if snapshot.kind not in ("vm", "image") or not snapshot.disks:
        raise UsageError(f"restore vm: snapshot {snapshot.short_id} holds no disks")
    # Absolute: start.sh names the disks and sockets, wherever it is run from.
    options = replace(options, target_dir=options.target_dir.absolute())
    options.target_dir.mkdir(parents=True, exist_ok=True)
    result = RestoreVmResult()
    _plan_disks(snapshot, options, result)
    _restore_disks(repo, snapshot, options, progress, cancel, result)
    config = dict(snapshot.vm_config or {})
    result.config_path = options.target_dir / "vm.json"
    result.config_path.write_text(json.dumps(config, indent=1, sort_keys=True))
    if config.get("argv"):
        name = options.name or f"{config.get('name') or snapshot.paths[0]}-restored"
        result.command = vm_command(config, result.disks, name, options.target_dir, result.formats)
        if options.no_network:
            result.command = without_network(result.command)
        (options.target_dir / "start.sh").write_text(
            "#!/bin/sh\nexec " + shlex.join(result.command) + "\n"
        )
        os.chmod(options.target_dir / "start.sh", 0o755)
    if options.start:
        if result.command is None:
            raise RestoreError("restore vm --start: the snapshot has no QEMU command line")
        process = start_qemu(result.command, options.target_dir)
        result.pid, result.qmp_socket = process.pid, options.target_dir / "qmp.sock"
    return result
