"""Use case: an automatic restore test (Veeam SureBackup). Boot the backed-up VM in
isolation, its disks served from the repository under throw-away copy-on-write overlays,
with no network, and see whether the guest shows a sign of life in time."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stratavault.errors import SourceError, UsageError
from stratavault.jobs._serve import ServeOptions, serve_snapshot
from stratavault.jobs._vm_boot import boot_command, make_overlays, start_qemu
from stratavault.repo import Repository
from stratavault.snapshot import Snapshot
from stratavault.sources import GuestAgent, QmpSession, find_guest_agent_socket

__all__ = ["BootCheckOptions", "BootCheckResult", "verify_boot"]

_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class BootCheckOptions:
    """How long to wait and for what."""

    timeout_s: float = 300.0
    expect: str | None = None
    """A regular expression searched in the serial console; without it, the sign of life
    is an answer of the guest agent (the VM must have an agent channel)."""
    log_dir: Path | None = None
    """Where the console log is kept (default: a new temporary folder, kept)."""


@dataclass(slots=True)
class BootCheckResult:
    """What the boot test saw."""

    passed: bool
    reason: str
    """The sign of life seen, or why there was none."""
    seconds: float
    console_log: Path


def verify_boot(repo: Repository, snapshot: Snapshot, options: BootCheckOptions) -> BootCheckResult:
    """Boot ``snapshot`` isolated (served disks under local overlays, ``-nic none``, serial
    console to a log that is kept) and wait up to ``timeout_s`` for the sign of life; the VM
    is stopped and the overlays removed at the end, whatever happens. Never writes to the
    repository."""
    config = dict(snapshot.vm_config or {})
    if not config.get("argv"):
        raise UsageError(f"verify --boot: snapshot {snapshot.short_id} has no QEMU command line")
    expect = re.compile(options.expect) if options.expect else None
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="sv-verify-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    console = log_dir / f"console-{snapshot.short_id}.log"
    console.write_bytes(b"")
    run_dir = Path(tempfile.mkdtemp(prefix="sv-boot-", dir="/tmp"))  # short: unix sockets
    try:
        with serve_snapshot(repo, snapshot, ServeOptions(unix_path=run_dir / "nbd.sock")) as served:
            sizes = {d.name: d.size_bytes for d in snapshot.disks}
            overlays = make_overlays(served.uris, sizes, run_dir)
            name = f"{config.get('name') or 'vm'}-verify"
            command = boot_command(config, overlays, name, run_dir, console=console)
            (log_dir / f"command-{snapshot.short_id}.txt").write_text(shlex.join(command) + "\n")
            started = time.monotonic()
            proc = start_qemu(command, run_dir)
            try:
                passed, reason = _watch(proc.poll, run_dir, console, expect, options.timeout_s)
            finally:
                _stop_qemu(proc.pid, run_dir)
                proc.wait()
            seconds = time.monotonic() - started
    finally:
        qemu_log = run_dir / "qemu.log"
        if qemu_log.exists():
            shutil.copy(qemu_log, log_dir / f"qemu-{snapshot.short_id}.log")
        shutil.rmtree(run_dir, ignore_errors=True)
    return BootCheckResult(passed, reason, seconds, console)


def _watch(
    poll: Callable[[], int | None],
    run_dir: Path,
    console: Path,
    expect: re.Pattern[str] | None,
    timeout_s: float,
) -> tuple[bool, str]:
    """Wait for the sign of life; (passed, reason)."""
    agent = None
    if expect is None:
        with QmpSession(run_dir / "qmp.sock", timeout_s=10) as session:
            agent = find_guest_agent_socket(session)
        if agent is None:
            raise UsageError("verify --boot: the VM has no guest agent channel; give --expect TEXT")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if expect is not None:
            match = expect.search(console.read_text(errors="replace"))
            if match:
                return True, f"console showed {match.group(0)!r}"
        elif agent is not None and _agent_answers(agent):
            return True, "the guest agent answered guest-ping"
        if poll() is not None:
            return False, "QEMU exited before the guest showed a sign of life"
        time.sleep(_POLL_S)
    what = f"no console line matching {expect.pattern!r}" if expect else "no guest agent answer"
    return False, f"{what} within {timeout_s:g} s"


def _agent_answers(socket_path: Path) -> bool:
    with contextlib.suppress(SourceError, OSError), GuestAgent(socket_path, timeout_s=1) as agent:
        agent.execute("guest-ping")
        return True
    return False


def _stop_qemu(pid: int, run_dir: Path) -> None:
    """quit over QMP, else SIGKILL."""
    with (
        contextlib.suppress(SourceError, OSError),
        QmpSession(run_dir / "qmp.sock", timeout_s=5) as session,
    ):
        session.execute("quit")
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
