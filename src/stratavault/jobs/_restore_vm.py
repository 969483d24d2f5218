"""Use case: restore a whole VM (every disk and its configuration), and start it under a
new name from the restored disks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratavault.errors import RestoreError, SourceError, UsageError
from stratavault.jobs._progress import Cancellation, Progress
from stratavault.jobs._restore_disk import RestoreDiskOptions, RestoreDiskResult, restore_disk
from stratavault.repo import Repository
from stratavault.snapshot import Snapshot
from stratavault.sources import QmpSession

__all__ = ["RestoreVmOptions", "RestoreVmResult", "restore_vm", "vm_command"]

_STARTABLE_FORMATS = ("raw", "qcow2")
_SOCKET_OPTIONS = ("-qmp", "-chardev", "-monitor", "-serial", "-vnc", "-qmp-pretty")
_DROPPED_FLAGS = ("-daemonize",)
_DROPPED_WITH_VALUE = ("-pidfile",)


@dataclass(frozen=True, slots=True)
class RestoreVmOptions:
    """Where to restore a VM and whether to start it."""

    target_dir: Path
    format: str | None = None
    """Format of every restored disk; default: each disk's original format when it is raw
    or qcow2, else qcow2."""
    start: bool = False
    name: str = ""
    """Name of the started VM (default: the original name + "-restored")."""
    verify: bool = False


@dataclass(slots=True)
class RestoreVmResult:
    """What was restored and, with ``start``, the running VM."""

    disks: dict[str, Path] = field(default_factory=dict)
    results: list[RestoreDiskResult] = field(default_factory=list)
    config_path: Path | None = None
    command: list[str] | None = None
    """The QEMU command line that starts the VM from the restored disks."""
    pid: int | None = None
    qmp_socket: Path | None = None


def _original_formats(config: Mapping[str, Any]) -> dict[str, str]:
    return {str(d["device"]): str(d.get("format", "raw")) for d in config.get("disks", [])}


def _rewrite_socket_paths(arg: str, run_dir: Path) -> str:
    """Point unix sockets and files of a monitor/chardev option into ``run_dir``."""
    arg = re.sub(r"(path=)([^,]+)", lambda m: m[1] + str(run_dir / Path(m[2]).name), arg)
    arg = re.sub(r"(unix:)([^,]+)", lambda m: m[1] + str(run_dir / Path(m[2]).name), arg)
    return re.sub(r"(file:)([^,]+)", lambda m: m[1] + str(run_dir / Path(m[2]).name), arg)


def vm_command(
    config: Mapping[str, Any], disks: Mapping[str, Path], name: str, run_dir: Path
) -> list[str]:
    """The stored QEMU command line with the restored disks in place of the original
    images, the new name, its monitors and consoles in ``run_dir`` (plus a QMP socket
    ``run_dir/qmp.sock``), and no ``-daemonize``/``-pidfile``."""
    argv = config.get("argv")
    if not argv:
        raise RestoreError("starting the restored VM - the snapshot has no QEMU command line")
    files = {str(d["filename"]): disks[str(d["device"])] for d in config.get("disks", [])}
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in _DROPPED_FLAGS:
            continue
        if arg in _DROPPED_WITH_VALUE:
            next(args, None)
            continue
        if arg == "-name":
            next(args, None)
            out += ["-name", name]
            continue
        out.append(arg)
        if arg in _SOCKET_OPTIONS:
            value = next(args, None)
            if value is not None:
                out.append(_rewrite_socket_paths(value, run_dir))
    rewritten = []
    for arg in out:
        for old, new in files.items():
            arg = arg.replace(old, str(new))
        rewritten.append(arg)
    if "-name" not in rewritten:
        rewritten += ["-name", name]
    return [*rewritten, "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off"]


def _restore_disks(
    repo: Repository, snapshot: Snapshot, options: RestoreVmOptions,
    progress: Progress | None, cancel: Cancellation | None, result: RestoreVmResult,
) -> None:  # fmt: skip
    formats = _original_formats(snapshot.vm_config or {})
    for ref in snapshot.disks:
        original = formats.get(ref.name, "raw")
        fmt = options.format or (original if original in _STARTABLE_FORMATS else "qcow2")
        if options.start and fmt != original:
            raise UsageError(
                f"restore vm --start: disk {ref.name} was {original}, restoring as {fmt} "
                "would not match the command line; restore without --start and adapt it"
            )
        target = options.target_dir / f"{Path(ref.name).stem}.{fmt}"
        disk_options = RestoreDiskOptions(
            target=target, disk=ref.name, format=fmt, verify=options.verify
        )
        result.results.append(
            restore_disk(repo, snapshot, disk_options, progress=progress, cancel=cancel)
        )
        result.disks[ref.name] = target


def _start(command: list[str], run_dir: Path, resume: bool) -> tuple[int, Path]:
    """Start QEMU detached; wait for its QMP socket; resume it when it starts paused."""
    log = (run_dir / "qemu.log").open("ab")
    try:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    except OSError as exc:
        raise SourceError(f"starting the restored VM - {exc.strerror or exc}") from exc
    finally:
        log.close()
    qmp = run_dir / "qmp.sock"
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            tail = (run_dir / "qemu.log").read_text(errors="replace")[-500:]
            raise SourceError(f"starting the restored VM - QEMU exited: {tail.strip()}")
        with contextlib.suppress(SourceError):
            with QmpSession(qmp, timeout_s=5) as session:
                if resume and session.execute("query-status").get("status") == "prelaunch":
                    session.execute("cont")
            return proc.pid, qmp
        if time.monotonic() > deadline:
            proc.kill()
            raise SourceError(f"starting the restored VM - no QMP socket at {qmp} after 15 s")
        time.sleep(0.1)


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
    options.target_dir.mkdir(parents=True, exist_ok=True)
    result = RestoreVmResult()
    _restore_disks(repo, snapshot, options, progress, cancel, result)
    config = dict(snapshot.vm_config or {})
    result.config_path = options.target_dir / "vm.json"
    result.config_path.write_text(json.dumps(config, indent=1, sort_keys=True))
    if config.get("argv"):
        name = options.name or f"{config.get('name') or snapshot.paths[0]}-restored"
        result.command = vm_command(config, result.disks, name, options.target_dir)
        (options.target_dir / "start.sh").write_text(
            "#!/bin/sh\nexec " + " ".join(_quote(a) for a in result.command) + "\n"
        )
        os.chmod(options.target_dir / "start.sh", 0o755)
    if options.start:
        if result.command is None:
            raise RestoreError("restore vm --start: the snapshot has no QEMU command line")
        resume = config.get("status") == "running"
        result.pid, result.qmp_socket = _start(result.command, options.target_dir, resume)
    return result


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"
