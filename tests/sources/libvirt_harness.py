"""A private libvirtd for the tests, and OS-less domains on it.

The daemon runs as root in its own mount namespace (``unshare --mount``) where
``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt`` and ``/var/log/libvirt``
are bind mounts of folders under a scratch folder, so it shares nothing with a
system libvirtd: its own ``qemu.conf`` (QEMU as root, so it can open /dev/kvm and
the test's files; no namespaces, no security driver, no virtlogd) and its own
socket, reached with ``qemu:///system?socket=...``. ``/var/cache/libvirt`` is a
bind mount of a folder that outlives the session, so QEMU's capabilities are
probed (seconds) once per machine, not once per daemon. One daemon per test
session (per xdist worker); every domain is destroyed and undefined and the
daemon stopped at the end.

Domains are OS-less (SeaBIOS, started paused): guest writes are simulated with
HMP ``qemu-io`` through each disk's device backend, as in ``vm_harness``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.sources.vm_harness import ACCEL

CACHE_DIR = Path("/var/tmp/stratavault-test-libvirt-cache")
"""libvirt's /var/cache/libvirt for the test daemons (QEMU capabilities), kept between runs."""
_BIND = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
}


@dataclass
class Libvirtd:
    """A running private libvirtd."""

    base: Path
    process: subprocess.Popen[bytes]

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.base}/run/libvirt-sock"

    def connect(self) -> Any:
        import libvirt

        return libvirt.open(self.uri)

    def qemu_pid(self, name: str) -> int:
        """Process id of the QEMU running domain ``name``."""
        return int((self.base / "run" / "qemu" / f"{name}.pid").read_text())


def start_libvirtd(base: Path) -> Libvirtd:
    """Start a private libvirtd with its folders under ``base``; wait until it answers."""
    for name in _BIND:
        (base / name).mkdir(parents=True, exist_ok=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    (base / "etc" / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{base}/run"\nunix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\nauth_unix_ro = "none"\nlog_outputs = "2:stderr"\n'
    )
    (base / "etc" / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nnamespaces = []\n'
        'stdio_handler = "file"\nsecurity_driver = "none"\n'
    )
    mounts = [(base / name, target) for name, target in _BIND.items()]
    mounts.append((CACHE_DIR, "/var/cache/libvirt"))
    script = " && ".join(f"mkdir -p {t} && mount --bind {s} {t}" for s, t in mounts)
    script += f" && exec libvirtd -f {base}/etc/libvirtd.conf -p {base}/libvirtd.pid"
    log = (base / "libvirtd.log").open("wb")
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    daemon = Libvirtd(base, process)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"libvirtd exited: {(base / 'libvirtd.log').read_text()}")
        if (base / "run" / "libvirt-sock").exists():
            with contextlib.suppress(Exception):
                daemon.connect().close()
                return daemon
        if time.monotonic() > deadline:
            stop_libvirtd(daemon)
            raise RuntimeError("libvirtd did not answer within 120 s")
        time.sleep(0.05)


def stop_libvirtd(daemon: Libvirtd) -> None:
    """Destroy and undefine every domain, stop the daemon, kill any QEMU it left."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        connection = daemon.connect()
        for domain in connection.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                if domain.isActive():
                    domain.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        connection.close()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        daemon.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait()
    for pid_file in (daemon.base / "run" / "qemu").glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """One private libvirtd for the test session (per xdist worker)."""
    pytest.importorskip("libvirt")
    if shutil.which("libvirtd") is None or os.geteuid() != 0:
        pytest.skip("needs libvirtd (scripts/setup.sh installs it) and root")
    base = Path(tempfile.mkdtemp(prefix="sv-lvd-", dir="/tmp"))
    daemon = start_libvirtd(base)
    yield daemon
    stop_libvirtd(daemon)
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class Domain:
    """An OS-less libvirt domain with disks ``vda``, ``vdb``... (by default qcow2)."""

    daemon: Libvirtd
    connection: Any
    name: str
    folder: Path
    disks: list[Path]
    guest_agent: bool = False
    boot: tuple[Path, Path, str] | None = None
    """Direct kernel boot of a real guest: (kernel, initrd, command line); None: OS-less."""
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def serial_log(self) -> Path:
        return self.folder / "serial.log"

    @property
    def domain(self) -> Any:
        return self.connection.lookupByName(self.name)

    def xml(self) -> str:
        devices = []
        for i, disk in enumerate(self.disks):
            fmt = disk.suffix[1:]
            devices.append(
                f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
                f"<source file='{disk}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/>"
                "</disk>"
            )
        if self.guest_agent:
            devices.append(
                f"<channel type='unix'><source mode='bind' path='{self.folder}/qga.sock'/>"
                "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
            )
        kind, memory, boot, cpu = "kvm" if ACCEL == "kvm" else "qemu", 64, "", ""
        if self.boot is not None:  # a Linux guest boots only under TCG here
            kernel, initrd, cmdline = self.boot
            kind, memory, cpu = "qemu", 256, "<cpu mode='maximum'/>"
            boot = f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline>"
            devices.append(
                f"<serial type='file'><source path='{self.serial_log}'/><target port='0'/></serial>"
            )
        return (
            f"<domain type='{kind}'><name>{self.name}</name><memory unit='MiB'>{memory}</memory>"
            f"<vcpu>1</vcpu>{cpu}<os><type arch='x86_64' machine='q35'>hvm</type>{boot}</os>"
            "<on_reboot>destroy</on_reboot><devices>"
            "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
            f"{''.join(devices)}<controller type='usb' model='none'/>"
            "<memballoon model='none'/></devices></domain>"
        )

    def start(self, *, paused: bool = True) -> None:
        """Start the domain, by default paused (SeaBIOS would burn a core; writes work)."""
        import libvirt

        self.domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
        root = ET.fromstring(self.domain.XMLDesc(0))
        self.aliases = {
            str(d.find("target").get("dev")): str(d.find("alias").get("name"))  # type: ignore[union-attr]
            for d in root.iterfind("./devices/disk")
        }

    def wait_for(self, marker: str, timeout_s: float = 120.0) -> None:
        """Wait until ``marker`` appears on the real guest's serial console."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.serial_log.read_text(errors="replace"):
            assert self.domain.isActive(), self.serial_log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"{marker!r} not seen after {timeout_s} s"
            time.sleep(0.1)

    def wait_for_agent(self, timeout_s: float = 60.0) -> None:
        """Wait until libvirt sees the guest agent's channel connected."""
        deadline = time.monotonic() + timeout_s
        while True:
            root = ET.fromstring(self.domain.XMLDesc(0))
            states = [t.get("state") for t in root.iterfind("./devices/channel/target")]
            if "connected" in states:
                return
            assert time.monotonic() < deadline, f"guest agent not connected after {timeout_s} s"
            time.sleep(0.1)

    def shut_down(self) -> None:
        """A clean QEMU exit (SIGTERM): persistent bitmaps are stored in the images."""
        import libvirt

        self.domain.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)

    def kill9(self) -> None:
        """SIGKILL of the domain's QEMU (as in a host crash); libvirt sees it die."""
        pid = self.daemon.qemu_pid(self.name)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.domain.isActive():
            assert time.monotonic() < deadline, "libvirt did not notice QEMU's death"
            time.sleep(0.02)

    def write(self, device: str, pattern: int, offset: int, length: int) -> None:
        """A guest write of ``length`` bytes of ``pattern`` at ``offset`` on ``device``."""
        self.hmp_io(device, f"write -P {pattern:#x} {offset} {length}")

    def hmp_io(self, device: str, command: str) -> None:
        import libvirt_qemu

        line = f'qemu-io -d /machine/peripheral/{self.aliases[device]}/virtio-backend "{command}"'
        flag = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        out = libvirt_qemu.qemuMonitorCommand(self.domain, line, flag)
        assert "error" not in out.lower() and "failed" not in out.lower(), out

    def checkpoints(self) -> list[str]:
        return sorted(c.getName() for c in self.domain.listAllCheckpoints(0))

    def job_type(self) -> int:
        """libvirt's job type for the domain (0: no job)."""
        return int(self.domain.jobInfo()[0])


@pytest.fixture
def make_domain(libvirtd: Libvirtd, short_tmp: Path) -> Iterator[Callable[..., Domain]]:
    """``make_domain(sizes_mib, fmts=..., guest_agent=False) -> Domain``: defined, not started."""
    import libvirt

    connection = libvirtd.connect()
    made: list[Domain] = []

    def make(
        sizes_mib: tuple[int, ...] = (64, 32),
        *,
        fmts: tuple[str, ...] | None = None,
        guest_agent: bool = False,
        boot: tuple[Path, Path, str] | None = None,
        disks: list[Path] | None = None,
    ) -> Domain:
        """OS-less with fresh disks; or, with ``boot`` and ``disks``, a real guest."""
        folder = short_tmp / f"dom{len(made)}"
        folder.mkdir()
        if disks is not None:
            sizes_mib = ()
        disks = list(disks or [])
        for i, size in enumerate(sizes_mib):
            fmt = fmts[i] if fmts else "qcow2"
            disk = folder / f"disk{i}.{fmt}"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", fmt, str(disk), f"{size}M"], check=True
            )
            disks.append(disk)
        name = f"sv-{os.getpid()}-{len(made)}-{folder.parent.name[-6:]}"
        domain = Domain(
            libvirtd, connection, name, folder, disks, guest_agent=guest_agent, boot=boot
        )
        connection.defineXML(domain.xml())
        made.append(domain)
        return domain

    yield make
    for domain in made:
        with contextlib.suppress(libvirt.libvirtError):
            if domain.domain.isActive():
                domain.domain.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            domain.domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    connection.close()
