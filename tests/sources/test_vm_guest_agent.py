"""Quiescing: the guest-agent client, freeze/thaw around the transaction, real and fake agents.

The real test guest (tests/guest) runs qemu-ga under TCG; a small fake agent on a socket
checks the stream resynchronisation and the order of freeze, transaction and thaw, which a
real agent cannot show from outside.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stratavault.errors import SourceError
from stratavault.sources import GuestAgent, QmpSession, VmBackup, list_vm_disks
from tests.guest.fixtures import MakeGuest
from tests.sources.vm_harness import MiB, Vm, make_vm, plain, short_tmp

__all__ = ["make_vm", "short_tmp"]  # fixtures

pytestmark = pytest.mark.infra("qemu")


class FakeAgent:
    """A qemu-ga stand-in: sends stale junk first, answers sync/freeze/thaw, records calls."""

    def __init__(self, path: Path, on_command: Callable[[str], Any] | None = None) -> None:
        self.path = path
        self.calls: list[str] = []
        self.on_command = on_command or (lambda command: None)
        self.fail: set[str] = set()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b'{"return": "stale reply"}\n\xff{"return": 12345}\n')
                buffer = b""
                while True:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buffer += data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        conn.sendall(self._answer(json.loads(line.strip(b"\xff"))))

    def _answer(self, message: dict[str, Any]) -> bytes:
        command = message["execute"]
        self.calls.append(command)
        if command == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": message["arguments"]["id"]}).encode() + b"\n"
        self.on_command(command)
        if command in self.fail:
            return b'{"error": {"class": "GenericError", "desc": "freeze refused"}}\n'
        value: Any = {"guest-fsfreeze-status": "thawed"}.get(command, 2)
        return json.dumps({"return": value}).encode() + b"\n"

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake_agent(short_tmp: Path) -> Iterator[Callable[..., FakeAgent]]:
    agents: list[FakeAgent] = []

    def make(on_command: Callable[[str], Any] | None = None) -> FakeAgent:
        agent = FakeAgent(short_tmp / f"agent{len(agents)}.sock", on_command)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


def test_client_resynchronises_past_stale_bytes(fake_agent: Callable[..., FakeAgent]) -> None:
    agent = fake_agent()
    with GuestAgent(agent.path, timeout_s=2) as client:
        assert client.fsfreeze_status() == "thawed"
        assert client.fsfreeze_freeze() == 2
        assert client.fsfreeze_thaw() == 2
    assert agent.calls == [
        "guest-sync-delimited", "guest-fsfreeze-status", "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    ]  # fmt: skip


def test_agent_error_names_command_and_message(fake_agent: Callable[..., FakeAgent]) -> None:
    agent = fake_agent()
    agent.fail.add("guest-fsfreeze-freeze")
    with (
        GuestAgent(agent.path, timeout_s=2) as client,
        pytest.raises(SourceError, match=r"'guest-fsfreeze-freeze'.*freeze refused"),
    ):
        client.fsfreeze_freeze()


def test_missing_agent_socket_is_a_clear_error(short_tmp: Path) -> None:
    with pytest.raises(SourceError, match=f"guest agent at {short_tmp}/none.sock"):
        GuestAgent(short_tmp / "none.sock", timeout_s=1)


def jobs_and_bitmaps(session: QmpSession) -> tuple[int, list[str]]:
    jobs = len(session.execute("query-block-jobs"))
    return jobs, [b.name for d in list_vm_disks(session) for b in d.bitmaps]


def test_freeze_just_before_and_thaw_right_after_the_transaction(
    make_vm: Callable[..., Vm], short_tmp: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    session = make_vm((16, 16)).start()
    seen: dict[str, tuple[int, list[str]]] = {}
    agent = fake_agent(lambda command: seen.setdefault(command, jobs_and_bitmaps(session)))
    with VmBackup(session, short_tmp / "s", guest_agent_socket=agent.path) as backup:
        assert backup.consistency_text == "application-consistent (fs frozen)"
        assert backup.frozen_s is not None
    # Frozen: nothing started yet. Thawed: both fleecing jobs run, both new bitmaps exist.
    assert seen["guest-fsfreeze-freeze"] == (0, [])
    new = [e.new_bitmap for e in backup.exports]
    assert [plain(name) for name in new] == ["stratavault-1", "stratavault-1"]
    assert seen["guest-fsfreeze-thaw"] == (2, new)
    assert agent.calls[-2:] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


def test_thaw_even_when_the_transaction_fails(
    make_vm: Callable[..., Vm], short_tmp: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    session = make_vm((16,)).start()

    def sabotage(command: str) -> None:
        if command == "guest-fsfreeze-freeze":  # the fleecing target vanishes
            (node,) = [
                n["node-name"] for n in session.execute("query-named-block-nodes", {"flat": True})
                if n["node-name"].startswith("sv-fl")
            ]  # fmt: skip
            session.execute("blockdev-del", {"node-name": node})

    agent = fake_agent(sabotage)
    with pytest.raises(SourceError, match="'transaction'"):
        VmBackup(session, short_tmp / "s", guest_agent_socket=agent.path).__enter__()
    assert agent.calls[-2:] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert jobs_and_bitmaps(session) == (0, [])
    assert list((short_tmp / "s").iterdir()) == []


def test_refused_freeze_is_crash_consistent_and_still_thaws(
    make_vm: Callable[..., Vm], short_tmp: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    session = make_vm((16,)).start()
    agent = fake_agent()
    agent.fail.add("guest-fsfreeze-freeze")
    with VmBackup(session, short_tmp / "s", guest_agent_socket=agent.path) as backup:
        assert backup.consistency.value == "crash-consistent"
        assert "fsfreeze failed" in backup.consistency_detail
        assert "freeze refused" in backup.consistency_detail
    assert agent.calls[-1] == "guest-fsfreeze-thaw"


def needs_recovery(image: Path) -> bool:
    """Whether the ext4 on ``image`` (raw) has a journal to replay."""
    out = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    features = next(line for line in out.splitlines() if line.startswith("Filesystem features"))
    return "needs_recovery" in features


def test_real_guest_is_frozen_for_the_transaction_and_its_data_disk_is_clean(
    make_guest: MakeGuest, short_tmp: Path
) -> None:
    vm = make_guest(append=["sv.writer=1", "sv.writer_interval=0.05"])
    vm.wait_for("stratavault-guest: writer started")
    copy = short_tmp / "data.raw"
    with QmpSession(vm.qmp_path, timeout_s=30) as session:
        start = time.monotonic()
        with VmBackup(session, short_tmp / "s", freeze_timeout_s=60) as backup:
            took = time.monotonic() - start
            assert backup.consistency_text == "application-consistent (fs frozen)"
            assert backup.frozen_s is not None
            print(f"guest frozen for {backup.frozen_s * 1000:.0f} ms (TCG)")
            assert backup.frozen_s < 5
            vdb = next(e for e in backup.exports if e.device == "vdb")
            subprocess.run(["qemu-img", "convert", "-O", "raw", vdb.uri, str(copy)], check=True)
    with GuestAgent(vm.qga_path, timeout_s=30) as agent:
        assert agent.fsfreeze_status() == "thawed"
    # Frozen ext4 has its journal checkpointed: the point in time needs no replay, fsck is clean.
    assert not needs_recovery(copy)
    subprocess.run(["e2fsck", "-fn", str(copy)], check=True, capture_output=True)
    assert took < 60
    assert copy.stat().st_size == 64 * MiB
