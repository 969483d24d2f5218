"""Real OS-less QEMU VMs (KVM, paused with -S) for the VM backup tests.

Guest writes are simulated with HMP ``qemu-io`` through each device's block
backend, which is what a guest's writes go through. Every VM is killed at the
end of the test that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stratavault.errors import SourceError
from stratavault.sources import QmpSession

MiB = 1 << 20
KiB = 1 << 10
ACCEL = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@dataclass
class Vm:
    """A QEMU process with disks ``vda``, ``vdb``... (qcow2 or raw, by suffix), a QMP socket."""

    folder: Path
    disks: list[Path]
    guest_agent: bool = False
    throttle: bool = False
    """Put a throttle filter node between each device and its format node."""
    process: subprocess.Popen[bytes] | None = None
    sessions: list[QmpSession] = field(default_factory=list)

    @property
    def qmp_path(self) -> Path:
        return self.folder / "vm.qmp"

    @property
    def agent_path(self) -> Path:
        return self.folder / "qga.sock"

    def argv(self) -> list[str]:
        argv = [
            "qemu-system-x86_64", "-accel", ACCEL, "-machine", "q35", "-m", "64M",
            "-nodefaults", "-display", "none", "-no-user-config", "-S",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if self.throttle:
            argv += ["-object", "throttle-group,id=tg0,x-bps-total=1000000000"]
        for i, disk in enumerate(self.disks):
            argv += [
                "-blockdev", f"driver=file,node-name=file{i},filename={disk}",
                "-blockdev", f"driver={disk.suffix[1:]},node-name=disk{i},file=file{i}",
            ]  # fmt: skip
            top = f"disk{i}"
            if self.throttle:
                top = f"throttle{i}"
                argv += [
                    "-blockdev",
                    f"driver=throttle,node-name={top},throttle-group=tg0,file=disk{i}",
                ]
            argv += ["-device", f"virtio-blk-pci,drive={top},id=vd{chr(ord('a') + i)}"]
        if self.guest_agent:
            argv += [
                "-chardev", f"socket,id=qga0,path={self.agent_path},server=on,wait=off",
                "-device", "virtio-serial",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]  # fmt: skip
        return argv

    def start(self) -> QmpSession:
        """Start QEMU and return a QMP session to it."""
        self.qmp_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:  # the socket file appears a moment before QEMU listens on it
            assert self.process.poll() is None, "QEMU exited at start"
            try:
                return self.connect()
            except SourceError:
                assert time.monotonic() < deadline, "QEMU did not open its QMP socket"
                time.sleep(0.01)

    def connect(self) -> QmpSession:
        session = QmpSession(self.qmp_path, timeout_s=10)
        self.sessions.append(session)
        return session

    def write(
        self, session: QmpSession, device: str, pattern: int, offset: int, length: int
    ) -> None:
        """A guest write of ``length`` bytes of ``pattern`` at ``offset`` on ``device``."""
        self.hmp_io(session, device, f"write -P {pattern:#x} {offset} {length}")

    def read_check(
        self, session: QmpSession, device: str, pattern: int, offset: int, length: int
    ) -> None:
        """Assert the guest reads ``pattern`` at ``offset``."""
        self.hmp_io(session, device, f"read -P {pattern:#x} {offset} {length}")

    def hmp_io(self, session: QmpSession, device: str, command: str) -> None:
        line = f'qemu-io -d /machine/peripheral/{device}/virtio-backend "{command}"'
        out = session.execute("human-monitor-command", {"command-line": line})
        assert "Pattern verification failed" not in out and "error" not in out.lower(), out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop QEMU (SIGKILL: an unclean exit, as in a host crash)."""
        for session in self.sessions:
            session.close()
        self.sessions.clear()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)
        self.process = None

    def quit(self) -> None:
        """Shut QEMU down cleanly (persistent bitmaps are stored in the images)."""
        assert self.process is not None
        session = self.sessions[-1] if self.sessions else self.connect()
        with contextlib.suppress(SourceError):  # QEMU may hang up before it answers
            session.execute("quit")
        self.process.wait(timeout=10)
        self.kill()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A scratch folder with a short path (unix socket paths are limited to 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="sv-vm-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def make_vm(short_tmp: Path) -> Iterator[Callable[..., Vm]]:
    """``make_vm(sizes_mib, guest_agent=False) -> Vm``: qcow2 disks created, QEMU not started."""
    vms: list[Vm] = []

    def make(
        sizes_mib: tuple[int, ...] = (64, 32),
        *,
        guest_agent: bool = False,
        throttle: bool = False,
        fmt: str = "qcow2",
        backing: Path | None = None,
    ) -> Vm:
        """Disks of ``fmt`` (qcow2 or raw); with ``backing``, qcow2 overlays of that image."""
        folder = short_tmp / f"vm{len(vms)}"
        folder.mkdir()
        disks = []
        for i, size in enumerate(sizes_mib):
            disk = folder / f"disk{i}.{fmt}"
            base = ["-b", str(backing), "-F", "qcow2"] if backing else []
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", fmt, *base, str(disk), f"{size}M"], check=True
            )
            disks.append(disk)
        vm = Vm(folder, disks, guest_agent=guest_agent, throttle=throttle)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.kill()


def plain(name: str | None) -> str | None:
    """A chain bitmap name without its random token: ``stratavault-1-3f9a0c21d4e8`` ->
    ``stratavault-1`` (names without a token unchanged)."""
    if name is None:
        return None
    match = re.fullmatch(r"(.*)-[0-9a-f]{12}", name)
    return match.group(1) if match else name


def nbd_map(uri: str, context: str | None = None) -> list[tuple[int, int, int]]:
    """``nbdinfo --map`` of an export: (offset, length, flags) runs."""
    option = f"--map={context}" if context else "--map"
    result = subprocess.run(
        ["nbdinfo", "--json", option, uri], capture_output=True, text=True, check=True
    )
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(result.stdout)]


def dirty_ranges(uri: str, context: str) -> list[tuple[int, int]]:
    """The (offset, length) runs the dirty bitmap context marks dirty (flag 1)."""
    return [(o, n) for o, n, flags in nbd_map(uri, context) if flags & 1]


def data_ranges(uri: str) -> list[tuple[int, int]]:
    """The (offset, length) runs ``base:allocation`` reports as allocated (not holes)."""
    return [(o, n) for o, n, flags in nbd_map(uri) if not flags & 1]


def reference_image(path: Path, size: int, writes: list[tuple[int, int, int]]) -> Path:
    """A qcow2 of ``size`` bytes holding ``writes`` ((pattern, offset, length)), in order."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    if writes:
        args = []
        for pattern, offset, length in writes:
            args += ["-c", f"write -P {pattern:#x} {offset} {length}"]
        subprocess.run(["qemu-io", *args, str(path)], check=True, capture_output=True)
    return path


def compare(uri: str, image: Path) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare`` of an export with an image (returncode 0: identical)."""
    return subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
