"""Use case: instant recovery. Start a backed-up VM now, its disks served from the
repository, and optionally move them to local storage while it runs.

Process model (docs/recovery.md):

- a **serving process** is forked from this one before any thread starts; it serves the
  snapshot's disks over NBD on ``run_dir/nbd.sock`` (read-only; the repository is locked
  shared) in its own session, so neither Ctrl-C nor the death of this process stops it. It
  stops when the QEMU process named by ``run_dir/qemu.pid`` is gone, or on SIGTERM, which this
  process sends only once QEMU no longer reads any export (after the migration);
- **QEMU** runs detached too, on one local qcow2 overlay per disk backed by its export, so
  the guest's writes stay local and the backup is only read;
- :func:`migrate_instant_vm` mirrors every disk (``blockdev-mirror`` from the overlay, so
  the guest's writes are kept) to a new local image, waits until all are ready, switches
  over (``block-job-complete``), drops the overlay nodes and then releases the export.

Interrupted anywhere, the VM keeps running: before the switch-over from the overlays (the
serving process lives as long as QEMU), after it from the local disks.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from stratavault.errors import Interrupted, RestoreError, SourceError, UsageError
from stratavault.jobs._progress import Cancellation, Progress, ProgressState
from stratavault.jobs._serve import ServeOptions, serve_snapshot
from stratavault.jobs._vm_boot import (
    boot_command,
    disk_files,
    make_overlays,
    original_formats,
    process_alive,
    read_pid,
    start_qemu,
    vm_command,
    wait_gone,
)
from stratavault.repo import Repository
from stratavault.snapshot import Snapshot
from stratavault.sources import QmpSession

__all__ = ["InstantOptions", "InstantVm", "migrate_instant_vm", "start_instant_vm"]

_READY_TIMEOUT_S = 60.0
_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class InstantOptions:
    """Where the instant VM lives and what it is called."""

    run_dir: Path
    """Overlays, sockets (keep the path short: unix sockets), QEMU and server logs."""
    name: str = ""
    """Name of the VM (default: the original name + "-instant")."""


@dataclass(slots=True)
class InstantVm:
    """A VM running on served disks: QEMU and the serving process, both detached."""

    run_dir: Path
    command: list[str]
    qemu_pid: int
    server_pid: int
    qmp_socket: Path
    overlays: dict[str, Path]
    exports: dict[str, str]
    formats: dict[str, str]
    """Disk -> its original image format (what migration writes)."""
    sizes: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)
    """The snapshot's VM configuration."""
    migrated: dict[str, Path] = field(default_factory=dict)


def start_instant_vm(repo: Repository, snapshot: Snapshot, options: InstantOptions) -> InstantVm:
    """Serve the disks of a VM snapshot (forked serving process), put a qcow2 overlay on
    each export and start QEMU on them with the stored command line; returns once QEMU
    runs. Call it before this process starts threads (it forks)."""
    config = dict(snapshot.vm_config or {})
    if snapshot.kind not in ("vm", "image") or not snapshot.disks:
        raise UsageError(f"restore vm --instant: snapshot {snapshot.short_id} holds no disks")
    if not config.get("argv"):
        raise RestoreError(
            f"restore vm --instant: snapshot {snapshot.short_id} has no QEMU command line"
        )
    run_dir = options.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    running = read_pid(run_dir / "qemu.pid")
    if running is not None and process_alive(running):
        raise UsageError(f"restore vm --instant: a VM (pid {running}) still runs in {run_dir}")
    for stale in ("qemu.pid", "nbd.sock", "qmp.sock"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / stale).unlink()
    sock = run_dir / "nbd.sock"
    if len(str(sock).encode()) > 100:
        raise UsageError(f"restore vm --instant: {run_dir} is too long a path for unix sockets")
    server_pid = _spawn_server(repo, snapshot, sock, run_dir)
    try:
        exports = {d.name: f"nbd+unix:///{quote(d.name)}?socket={sock}" for d in snapshot.disks}
        sizes = {d.name: d.size_bytes for d in snapshot.disks}
        overlays = make_overlays(exports, sizes, run_dir)
        name = options.name or f"{config.get('name') or snapshot.paths[0]}-instant"
        command = boot_command(config, overlays, name, run_dir)
        proc = start_qemu(command, run_dir)
    except BaseException:
        _stop(server_pid)
        raise
    formats = original_formats(config)
    vm = InstantVm(
        run_dir=run_dir, command=command, qemu_pid=proc.pid, server_pid=server_pid,
        qmp_socket=run_dir / "qmp.sock", overlays=overlays, exports=exports,
        formats={n: formats.get(n, "raw") for n in exports}, sizes=sizes, config=config,
    )  # fmt: skip
    (run_dir / "instant.json").write_text(json.dumps(_describe(vm), indent=1))
    return vm


def _describe(vm: InstantVm) -> dict[str, Any]:
    return {
        "qemu_pid": vm.qemu_pid, "server_pid": vm.server_pid, "qmp_socket": str(vm.qmp_socket),
        "overlays": {k: str(v) for k, v in vm.overlays.items()}, "exports": vm.exports,
        "migrated": {k: str(v) for k, v in vm.migrated.items()}, "command": vm.command,
    }  # fmt: skip


# --- the serving process ------------------------------------------------------------------------


def _spawn_server(repo: Repository, snapshot: Snapshot, sock: Path, run_dir: Path) -> int:
    """Fork the serving process; return its pid once it listens."""
    ready_r, ready_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, ends with os._exit
        os.close(ready_r)
        _server_main(repo, snapshot, sock, run_dir, ready_w, parent)
    os.close(ready_w)
    try:
        readable, _, _ = select.select([ready_r], [], [], 30)
        ok = bool(readable) and os.read(ready_r, 1) == b"R"
    finally:
        os.close(ready_r)
    if not ok:
        _stop(pid)
        log = (run_dir / "server.log").read_text(errors="replace")[-800:].strip()
        raise RestoreError(f"serving snapshot {snapshot.short_id} on {sock} - failed: {log}")
    (run_dir / "server.pid").write_text(f"{pid}\n")
    return pid


def _server_main(
    repo: Repository, snapshot: Snapshot, sock: Path, run_dir: Path, ready: int, parent: int
) -> None:  # pragma: no cover - the forked child
    code = 1
    try:
        os.setsid()
        log = os.open(run_dir / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with serve_snapshot(repo, snapshot, ServeOptions(unix_path=sock)):
            os.write(ready, b"R")
            os.close(ready)
            _serve_while_needed(stop, run_dir, parent)
        code = 0
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(2, f"serving process: {exc!r}\n".encode())
    finally:
        os._exit(code)


def _serve_while_needed(stop: threading.Event, run_dir: Path, parent: int) -> None:
    """Until SIGTERM, or QEMU (``run_dir/qemu.pid``, remembered: QEMU removes it when it
    exits) is gone; or, when QEMU never started, until the starting process is gone."""
    qemu: int | None = None
    orphaned_at: float | None = None
    while not stop.wait(_POLL_S):
        qemu = qemu or read_pid(run_dir / "qemu.pid")
        if qemu is not None:
            if not process_alive(qemu):
                return
            continue
        if process_alive(parent):
            continue
        orphaned_at = orphaned_at or time.monotonic()
        if time.monotonic() - orphaned_at > 5:  # QEMU would have written its pid by now
            return


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, 10):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# --- migration ---------------------------------------------------------------------------------


def _source_nodes(session: QmpSession, overlays: dict[str, Path]) -> dict[str, str]:
    """Disk -> the node QEMU's device reads (the overlay's qcow2 node)."""
    nodes: dict[str, str] = {}
    for entry in session.execute("query-block"):
        inserted = entry.get("inserted") or {}
        for disk, path in overlays.items():
            if inserted.get("file") == str(path):
                nodes[disk] = str(inserted["node-name"])
    missing = sorted(set(overlays) - set(nodes))
    if missing:
        raise RestoreError(f"migrating the instant VM - QEMU has no device on {missing}")
    return nodes


def migrate_instant_vm(
    vm: InstantVm,
    target_dir: Path,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
    speed_bytes_per_s: int = 0,
) -> dict[str, Path]:
    """Copy every disk of the running instant VM to ``target_dir`` (its original format)
    while the guest runs, switch QEMU over to the copies, drop the overlays and stop the
    serving process. Cancelled or failed before the switch-over, the mirrors are cancelled
    and the VM goes on from the overlays. ``speed_bytes_per_s`` limits each copy (0: no
    limit), to spare the storage while the guest runs."""
    target_dir.mkdir(parents=True, exist_ok=True)
    targets = disk_files(target_dir, {disk: vm.formats[disk] for disk in vm.overlays})
    for target in targets.values():
        if target.exists():
            raise UsageError(f"restore vm --migrate-to: {target} exists")
    with QmpSession(vm.qmp_socket, timeout_s=30) as session:
        sources = _source_nodes(session, vm.overlays)
        jobs = _start_mirrors(session, sources, targets, vm, speed_bytes_per_s)
        try:
            _wait_ready(session, jobs, vm, progress, cancel)
        except BaseException:
            for job in jobs:
                with contextlib.suppress(SourceError):
                    session.execute("block-job-cancel", {"device": job, "force": True})
            raise
        _switch_over(session, jobs, sources)
    vm.migrated = targets
    _release(vm)
    _write_start_script(vm, target_dir)
    return targets


def _write_start_script(vm: InstantVm, target_dir: Path) -> None:
    """``vm.json`` and ``start.sh`` in ``target_dir``: the VM on its local disks, for the
    next start (the running QEMU already uses them)."""
    (target_dir / "vm.json").write_text(json.dumps(vm.config, indent=1, sort_keys=True))
    name = vm.command[vm.command.index("-name") + 1] if "-name" in vm.command else "vm"
    command = vm_command(vm.config, vm.migrated, name, target_dir)
    script = target_dir / "start.sh"
    script.write_text("#!/bin/sh\nexec " + shlex.join(command) + "\n")
    script.chmod(0o755)


def _start_mirrors(
    session: QmpSession,
    sources: dict[str, str],
    targets: dict[str, Path],
    vm: InstantVm,
    speed: int,
) -> dict[str, str]:
    """Create the targets and start one mirror per disk; job id -> disk."""
    jobs: dict[str, str] = {}
    for n, (disk, target) in enumerate(targets.items()):
        fmt = vm.formats[disk]
        done = subprocess.run(
            ["qemu-img", "create", "-q", "-f", fmt, str(target), str(vm.sizes[disk])],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RestoreError(f"creating {target} - {done.stderr.strip()}")
        node = f"sv-local-{n}"
        session.execute(
            "blockdev-add",
            {"driver": fmt, "node-name": node, "file": {"driver": "file", "filename": str(target)}},
        )
        job = f"sv-migrate-{n}"
        session.execute(
            "blockdev-mirror",
            {"job-id": job, "device": sources[disk], "target": node, "sync": "full",
             "on-target-error": "stop", "speed": max(speed, 0)},
        )  # fmt: skip
        jobs[job] = disk
    return jobs


def _wait_ready(
    session: QmpSession, jobs: dict[str, str], vm: InstantVm,
    progress: Progress | None, cancel: Cancellation | None,
) -> None:  # fmt: skip
    """Until every mirror is ready (source and target in sync); fails when a job fails."""
    state = ProgressState(phase="migrate", bytes_total=sum(vm.sizes.values()))
    state.started = time.monotonic()
    report: Callable[[ProgressState], None] = progress.update if progress else lambda _s: None
    first_len: dict[str, int] = {}
    while True:
        if cancel is not None and cancel.cancelled:
            raise Interrupted("migration cancelled; the VM runs on from its instant overlays")
        running = {j["device"]: j for j in session.execute("query-block-jobs")}
        for job, disk in jobs.items():
            if job not in running:
                raise RestoreError(
                    f"migrating disk {disk} - the mirror stopped{_job_error(session, job)}"
                )
        _lift_limit_after_first_pass(session, {j: running[j] for j in jobs}, first_len)
        state.bytes_done = sum(int(j.get("offset", 0)) for j in running.values())
        report(state)
        if all(running[job].get("ready") for job in jobs):
            if progress:
                progress.done(state)
            return
        time.sleep(_POLL_S)


def _lift_limit_after_first_pass(
    session: QmpSession, running: dict[str, dict[str, Any]], first_len: dict[str, int]
) -> None:
    """Once a rate-limited mirror has copied what the disk held when it started, let it
    copy at full speed: a guest that writes faster than the limit would otherwise keep it
    from ever being in sync."""
    for job, info in running.items():
        total, offset = int(info.get("len", 0)), int(info.get("offset", 0))
        if total > 0:
            first_len.setdefault(job, total)
        if info.get("speed") and job in first_len and offset >= first_len[job]:
            session.execute("block-job-set-speed", {"device": job, "speed": 0})


def _job_error(session: QmpSession, job: str) -> str:
    """``: ERROR`` from the job's BLOCK_JOB_COMPLETED event, or ""."""
    for event in session.drain_events():
        data = event.get("data") or {}
        if event.get("event") == "BLOCK_JOB_COMPLETED" and data.get("device") == job:
            return f": {data.get('error') or 'without an error'}"
    return ""


def _switch_over(session: QmpSession, jobs: dict[str, str], sources: dict[str, str]) -> None:
    for job in jobs:
        session.execute("block-job-complete", {"device": job})
    for job in jobs:
        event = session.wait_event("BLOCK_JOB_COMPLETED", match={"device": job}, timeout_s=120)
        if event["data"].get("error"):
            raise RestoreError(f"switching {jobs[job]} to local storage - {event['data']['error']}")
    for node in sources.values():  # the overlays and their NBD clients go away
        with contextlib.suppress(SourceError):
            session.execute("blockdev-del", {"node-name": node})
    left = [n for n in session.execute("query-named-block-nodes") if n.get("drv") == "nbd"]
    if left:
        raise RestoreError(
            "migrating the instant VM - QEMU still reads the export through "
            f"{', '.join(str(n.get('node-name')) for n in left)}; the serving process stays"
        )


def _release(vm: InstantVm) -> None:
    """Stop the serving process and remove the overlays (QEMU no longer uses them)."""
    _stop(vm.server_pid)
    for path in vm.overlays.values():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    (vm.run_dir / "instant.json").write_text(json.dumps(_describe(vm), indent=1))
