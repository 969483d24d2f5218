"""QMP sessions, disk discovery and VM configuration against a real QEMU."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stratavault.errors import SourceError
from stratavault.sources import QmpSession, VmBackup, list_vm_disks, vm_config
from tests.sources.vm_harness import MiB, Vm, make_vm, plain, short_tmp

__all__ = ["make_vm", "short_tmp"]  # fixtures

pytestmark = pytest.mark.infra("qemu")


def test_session_talks_to_qemu_and_knows_its_pid(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    session = vm.start()
    assert vm.process is not None
    assert session.peer_pid == vm.process.pid
    assert session.execute("query-status")["status"] == "prelaunch"
    assert session.greeting["QMP"]["version"]["qemu"]["major"] >= 7


def test_qmp_error_names_the_command_and_qemus_message(make_vm: Callable[..., Vm]) -> None:
    session = make_vm().start()
    with pytest.raises(SourceError) as err:
        session.execute("block-dirty-bitmap-add", {"node": "nosuchnode", "name": "x"})
    message = str(err.value)
    assert "block-dirty-bitmap-add" in message
    assert "Cannot find device='nosuchnode' nor node-name='nosuchnode'" in message
    assert "GenericError" in message
    assert session.execute("query-status")["running"] is False  # still usable afterwards


def test_missing_socket_is_a_clear_error(short_tmp: Path) -> None:
    path = short_tmp / "nothere.qmp"
    with pytest.raises(SourceError, match=f"{path} - no such socket"):
        QmpSession(path, timeout_s=2)


def test_socket_of_a_dead_vm_is_a_clear_error(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    vm.start()
    vm.kill()  # SIGKILL leaves the socket file behind, nobody listens
    assert vm.qmp_path.exists()
    with pytest.raises(SourceError, match=f"connecting to QMP socket {vm.qmp_path} - .*refused"):
        QmpSession(vm.qmp_path, timeout_s=2)


def test_not_a_qmp_server_times_out_with_a_clear_error(short_tmp: Path) -> None:
    path = short_tmp / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(SourceError, match=f"connecting to QMP socket {path} - no answer"):
            QmpSession(path, timeout_s=0.5)
        assert time.monotonic() - start < 5
    finally:
        server.close()


def test_vm_dying_during_a_session_gives_an_error_not_a_hang(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm()
    session = vm.start()
    assert vm.process is not None
    vm.process.send_signal(signal.SIGKILL)
    vm.process.wait()
    start = time.monotonic()
    with pytest.raises(SourceError, match="query-status"):
        session.execute("query-status")
    assert time.monotonic() - start < 5
    session.close()


def test_wait_event_times_out_and_consumes_matching_events(make_vm: Callable[..., Vm]) -> None:
    session = make_vm().start()
    with pytest.raises(SourceError, match="waiting for QMP event BLOCK_JOB_CANCELLED"):
        session.wait_event("BLOCK_JOB_CANCELLED", timeout_s=0.2)
    session.execute("cont")
    session.execute("stop")
    assert session.wait_event("STOP", timeout_s=5)["event"] == "STOP"
    assert session.wait_event("RESUME", timeout_s=5)["event"] == "RESUME"  # kept in the backlog


def test_disks_and_bitmaps_are_discovered(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm((64, 32))
    session = vm.start()
    session.execute(
        "block-dirty-bitmap-add",
        {"node": "disk1", "name": "bm", "persistent": True, "granularity": 128 * 1024},
    )
    vm.write(session, "vdb", 0xAB, 1 * MiB, 64 * 1024)
    vda, vdb = list_vm_disks(session)
    assert (vda.device, vda.node_name, vda.format) == ("vda", "disk0", "qcow2")
    assert vda.filename == str(vm.disks[0])
    assert vda.virtual_size_bytes == 64 * MiB
    assert vda.qdev_path == "/machine/peripheral/vda/virtio-backend"
    assert vda.bitmaps == ()
    assert (vdb.device, vdb.node_name, vdb.virtual_size_bytes) == ("vdb", "disk1", 32 * MiB)
    (bitmap,) = vdb.bitmaps
    assert bitmap == vdb.bitmap("bm")
    assert (bitmap.count_bytes, bitmap.granularity_bytes) == (128 * 1024, 128 * 1024)
    assert bitmap.recording and bitmap.persistent
    assert not bitmap.inconsistent and not bitmap.busy


def test_vm_config_holds_the_command_line_and_disk_layout(make_vm: Callable[..., Vm]) -> None:
    vm = make_vm((16,))
    session = vm.start()
    config = vm_config(session)
    assert config["argv"] == vm.argv()
    assert config["pid"] == session.peer_pid
    assert config["qemu_version"].startswith("7.")
    assert config["memory_bytes"] == 64 * MiB
    assert config["cpus"] == 1
    assert config["status"] == "prelaunch"
    assert [d["device"] for d in config["disks"]] == ["vda"]
    assert config["disks"][0]["filename"] == str(vm.disks[0])


def test_disks_are_found_below_filter_nodes(make_vm: Callable[..., Vm], short_tmp: Path) -> None:
    vm = make_vm((16,), throttle=True)
    session = vm.start()
    session.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "bm"})
    (disk,) = list_vm_disks(session)
    assert (disk.device, disk.node_name, disk.format) == ("vda", "disk0", "qcow2")
    with VmBackup(session, short_tmp / "s", find_guest_agent=False) as backup:
        # A running backup puts a copy-before-write filter on top: still the same disk.
        (during,) = list_vm_disks(session)
        assert (during.node_name, during.bitmap("bm")) == ("disk0", disk.bitmap("bm"))
        vm.write(session, "vda", 0x5A, 0, 64 * 1024)
        assert backup.exports[0].node_name == "disk0"
    (after,) = list_vm_disks(session)
    new = backup.exports[0].new_bitmap
    assert plain(new) == "stratavault-1"
    assert [b.name for b in after.bitmaps] == [new, "bm"]


def test_session_works_from_inside_a_running_event_loop(make_vm: Callable[..., Vm]) -> None:
    """The private loop thread makes the session usable from async code too (a server)."""
    vm = make_vm((16,))
    vm.start().close()

    async def main() -> str:
        with QmpSession(vm.qmp_path, timeout_s=5) as session:
            return str(session.execute("query-status")["status"])

    assert asyncio.run(main()) == "prelaunch"
