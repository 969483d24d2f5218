"""Instant recovery with the real test guest (TCG): restore vm --instant boots the VM on disks
served from the repository at once; --migrate-to moves them to local disks while the guest
writes, keeps those writes and releases the export; a command killed during the move leaves
the instant VM running (its serving process lives as long as QEMU)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from stratavault.errors import SourceError
from stratavault.sources import GuestAgent, QmpSession
from tests.e2e.conftest import Cli
from tests.guest.build import GuestImage, break_root_filesystem, make_data_disk
from tests.guest.vm import GuestVM
from tests.sockets import wait_for_socket
from tests.sources import vm_harness

pytestmark = pytest.mark.infra("qemu")
short_tmp = vm_harness.short_tmp
MiB = 1 << 20
WRITER = "stratavault-guest: writer started"


def backup_paused_guest(
    cli: Cli,
    image: GuestImage,
    folder: Path,
    *,
    append: tuple[str, ...] = (),
    data_files: Mapping[str, bytes] | None = None,
    broken: bool = False,
    boot_size: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> None:
    """Back up the test guest, paused before it ran (no boot needed): its disks and its
    QEMU command line. ``broken``: its root filesystem is destroyed first."""
    boot = image.boot_overlay(folder / "boot0.qcow2", size=boot_size)
    if broken:
        break_root_filesystem(boot)
    data = make_data_disk(folder / "data0.qcow2", data_files or {"hello.txt": b"hello\n"})
    vm = GuestVM(
        image, [boot, data], append, log_path=folder / "serial.log", extra_args=["-S", *extra_args]
    )
    try:
        vm.start()
        assert vm.proc is not None
        wait_for_socket(vm.qmp_path, vm.proc, timeout_s=30)
        if not (cli.repo / "config").exists():
            assert cli("init").code == 0
        done = cli("backup", "vm", "--qmp", vm.qmp_path, "--name", "guest", "-q")
        assert done.code == 0, done.err
    finally:
        vm.cleanup()


def wait_console(log: Path, marker: str, timeout_s: float, proc_pid: int | None = None) -> float:
    """Seconds until ``marker`` is in ``log``."""
    start = time.monotonic()
    while marker not in (log.read_text(errors="replace") if log.exists() else ""):
        if proc_pid is not None and not _alive(proc_pid):
            raise AssertionError(f"QEMU exited before {marker!r}: {log.read_text()[-2000:]}")
        assert time.monotonic() - start < timeout_s, f"{marker!r} not seen: {log.read_text()}"
        time.sleep(0.05)
    return time.monotonic() - start


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _read_guest_file(qga: Path, path: str) -> bytes:
    with GuestAgent(qga, timeout_s=10) as agent:
        handle = agent.execute("guest-file-open", {"path": path, "mode": "r"})
        try:
            reply = agent.execute("guest-file-read", {"handle": handle, "count": 65536})
        finally:
            agent.execute("guest-file-close", {"handle": handle})
    return base64.b64decode(reply["buf-b64"])


def _counter(qga: Path) -> int:
    return int(_read_guest_file(qga, "/data/writer/counter").split()[0])


@pytest.fixture
def instant_cleanup() -> Iterator[list[Path]]:
    """Run folders whose QEMU and serving process are killed at teardown."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        for name in ("qemu.pid", "server.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((folder / name).read_text()), signal.SIGKILL)


def _start(cli: Cli, *args: str | Path) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("stratavault")
    return subprocess.Popen(
        [str(exe), "restore", "vm", "latest", "--instant", *map(str, args), "--json"],
        env={**os.environ, **cli.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _first_doc(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    doc = json.loads(line)
    assert doc["message_type"] == "instant_vm"
    return dict(doc)


def test_instant_vm_moves_to_local_disks_keeping_the_guest_writes(
    cli: Cli, test_guest_image: GuestImage, short_tmp: Path, instant_cleanup: list[Path]
) -> None:
    backup_paused_guest(cli, test_guest_image, short_tmp, append=("sv.writer=1",))
    run, local = short_tmp / "run", short_tmp / "local"
    instant_cleanup.append(run)
    started = time.monotonic()
    # 4 MiB/s per disk (QEMU counts zeroes too): moving the 128 MiB boot disk takes about
    # 30 s, longer than the boot; the guest writes meanwhile
    proc = _start(cli, "--to", run, "--migrate-to", local, "--migrate-limit", "4096")
    doc = _first_doc(proc)
    assert time.monotonic() - started < 10  # running at once, whatever the disks
    qemu, server = int(str(doc["qemu_pid"])), int(str(doc["server_pid"]))
    wait_console(run / "serial.log", WRITER, 180, qemu)
    assert proc.poll() is None, "the move should still be going on while the guest writes"
    before = _counter(run / "qga.sock")
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "migrated" in out
    assert not _alive(server)  # the export is released
    assert not list(run.glob("*-instant.qcow2"))
    with QmpSession(run / "qmp.sock") as qmp:
        nodes = qmp.execute("query-named-block-nodes")
        assert {n["drv"] for n in nodes} == {"qcow2", "file"}
        assert {n["file"] for n in nodes} == {str(local / "vda.qcow2"), str(local / "vdb.qcow2")}
    time.sleep(1)
    after = _counter(run / "qga.sock")
    assert after > before  # the guest writes on, to its local disks now
    with GuestAgent(run / "qga.sock", timeout_s=10) as agent, contextlib.suppress(SourceError):
        agent.execute("guest-shutdown")  # unmounts /data; no reply: the agent goes down
    deadline = time.monotonic() + 60
    while _alive(qemu):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # the local data disk holds the writes made before, during and after the move
    raw = short_tmp / "vdb.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", local / "vdb.qcow2", raw], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(
        ["debugfs", "-R", "cat /writer/counter", raw], capture_output=True, text=True
    )
    assert int(cat.stdout.split()[0]) >= after
    assert (local / "start.sh").exists()
    # the backup is unchanged
    assert cli("check", "--read-data").code == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_interrupted_during_the_move_leaves_the_instant_vm_running(
    cli: Cli,
    test_guest_image: GuestImage,
    short_tmp: Path,
    instant_cleanup: list[Path],
    sig: signal.Signals,
) -> None:
    backup_paused_guest(cli, test_guest_image, short_tmp, append=("sv.writer=1",))
    run, local = short_tmp / "run", short_tmp / "local"
    instant_cleanup.append(run)
    proc = _start(cli, "--to", run, "--migrate-to", local, "--migrate-limit", "1024")
    doc = _first_doc(proc)
    qemu, server = int(str(doc["qemu_pid"])), int(str(doc["server_pid"]))
    time.sleep(2)
    assert proc.poll() is None
    proc.send_signal(sig)  # SIGKILL: no clean-up of any kind
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "runs on from its instant overlays" in err, err
    wait_console(run / "serial.log", WRITER, 180, qemu)
    assert _alive(server) and _alive(qemu)
    first = _counter(run / "qga.sock")
    time.sleep(1.5)
    assert _counter(run / "qga.sock") > first  # the guest runs and writes on its overlays
    assert _read_guest_file(run / "qga.sock", "/data/hello.txt") == b"hello\n"
    with QmpSession(run / "qmp.sock") as qmp:
        jobs = qmp.execute("query-block-jobs")
        # Ctrl-C cancels the copies; after SIGKILL they go on in QEMU, never switched over
        assert (jobs == []) if sig == signal.SIGINT else len(jobs) == 2
        qmp.execute("quit")
    deadline = time.monotonic() + 15
    while _alive(server):  # the serving process ends with QEMU
        assert time.monotonic() < deadline, "the serving process outlived QEMU"
        time.sleep(0.1)
    assert cli("check", "--read-data").code == 0


def test_instant_boot_of_an_image_without_command_line_is_refused(
    cli: Cli, short_tmp: Path
) -> None:
    image = short_tmp / "disk.raw"
    image.write_bytes(b"\x01" * MiB)
    assert cli("init").code == 0
    assert cli("backup", "image", image, "-q").code == 0
    result = cli("restore", "vm", "latest", "--instant", "--to", short_tmp / "run")
    assert result.code == 1
    assert "no QEMU command line" in result.err
