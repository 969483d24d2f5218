"""Run the test guest under QEMU for tests: start, wait for a console line, talk to the guest
agent, run commands in the guest, stop. A `GuestVM` never outlives its `with` block.

The VM: q35, TCG with ``-cpu max`` (``STRATAVAULT_GUEST_ACCEL=kvm`` tries KVM with ``-cpu host``;
a Linux kernel hangs under KVM on the development machines), 256 MiB, ``-nodefaults``, no
network, serial console to a log file, QMP on a unix socket, qemu-ga on a virtio-serial port
whose chardev is a unix socket, direct kernel boot, and the disks as ``-blockdev`` nodes
``disk0``, ``disk1``... on virtio-blk devices ``vda``, ``vdb``...
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.guest.build import READY_MARKER, GuestImage

ACCEL_ENV = "STRATAVAULT_GUEST_ACCEL"
_PR_SET_PDEATHSIG = 1


class GuestError(RuntimeError):
    """The guest did not boot, QEMU died, or the guest agent or QMP failed or timed out."""


@dataclass(frozen=True)
class ExecResult:
    """What a command run with guest-exec returned."""

    exitcode: int
    stdout: bytes
    stderr: bytes


class _JsonSocket:
    """A unix socket carrying one JSON object per line (QMP, qemu-ga)."""

    def __init__(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"connect to {path}: no listener after {timeout} s") from None
                time.sleep(0.05)
        self.buf = b""

    def send(self, obj: dict[str, Any], prefix: bytes = b"") -> None:
        self.sock.sendall(prefix + json.dumps(obj).encode() + b"\n")

    def read_until(self, sep: bytes, deadline: float) -> bytes | None:
        """Bytes up to and including `sep`, or None when the deadline passes first."""
        while sep not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise GuestError("socket closed by QEMU")
            self.buf += data
        head, _, self.buf = self.buf.partition(sep)
        return head + sep

    def close(self) -> None:
        self.sock.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _accel_args() -> list[str]:
    accel = os.environ.get(ACCEL_ENV, "tcg") or "tcg"
    return ["-accel", accel, "-cpu", "max" if accel == "tcg" else "host"]


class GuestVM:
    """One QEMU process running the test guest with the given disks (qcow2, or raw if *.raw)."""

    def __init__(
        self,
        image: GuestImage,
        disks: Sequence[Path],
        append: Sequence[str] = (),
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.image = image
        self.disks = list(disks)
        self.rundir = Path(tempfile.mkdtemp(prefix="sv-vm-"))  # short: unix socket paths
        self.log_path = log_path or self.rundir / "serial.log"
        self.qmp_path = self.rundir / "qmp.sock"
        self.qga_path = self.rundir / "qga.sock"
        self.append = image.append(*append)
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._qmp: _JsonSocket | None = None
        self._qga: _JsonSocket | None = None

    def command(self) -> list[str]:
        """The QEMU command line."""
        cmd = ["qemu-system-x86_64", "-name", "sv-test-guest", *_accel_args(), "-M", "q35",
               "-m", "256M", "-nodefaults", "-display", "none", "-no-reboot",
               "-serial", f"file:{self.log_path}",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
               "-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
               "-device", "virtio-serial-pci,id=vser0",
               "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
               "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
               "-append", self.append]  # fmt: skip
        for i, disk in enumerate(self.disks):
            fmt = "raw" if disk.suffix in (".raw", ".img") else "qcow2"
            node = f"driver={fmt},node-name=disk{i},file.driver=file,file.filename={disk}"
            device = f"virtio-blk-pci,drive=disk{i},id=vd{chr(ord('a') + i)}"
            cmd += ["-blockdev", node, "-device", device]
        return cmd + self.extra_args

    def start(self) -> GuestVM:
        """Start QEMU (returns at once; wait for a marker next)."""
        self.log_path.touch()
        self.started_at = time.monotonic()
        with open(self.rundir / "qemu.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        return self

    def console(self) -> str:
        """The serial console so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, marker: str = READY_MARKER, timeout: float = 120.0) -> float:
        """Wait until `marker` appears on the console (at most `timeout` seconds from now);
        the seconds since QEMU was started. Fails early when QEMU exits."""
        started = time.monotonic()
        while marker not in self.console():
            if self.proc is None or self.proc.poll() is not None:
                raise GuestError(f"wait for {marker!r}: QEMU exited{self._tail()}")
            if time.monotonic() - started > timeout:
                raise GuestError(f"wait for {marker!r}: not seen after {timeout} s{self._tail()}")
            time.sleep(0.05)
        return time.monotonic() - self.started_at

    def _tail(self) -> str:
        err = (self.rundir / "qemu.stderr").read_text(errors="replace").strip()
        return f"; console:\n{self.console()[-3000:]}" + (f"\nqemu stderr: {err}" if err else "")

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command; its return value (events are skipped)."""
        if self._qmp is None:
            self._qmp = _JsonSocket(self.qmp_path, 10)
            self._qmp_reply({})  # greeting
            self._qmp.send({"execute": "qmp_capabilities"})
            self._qmp_reply({"return": {}})
        self._qmp.send({"execute": command, "arguments": arguments})
        return self._qmp_reply({"return": None})

    def _qmp_reply(self, _shape: dict[str, Any]) -> Any:
        assert self._qmp is not None
        while True:
            line = self._qmp.read_until(b"\n", time.monotonic() + 60)
            if line is None:
                raise GuestError("QMP: no reply within 60 s")
            msg = json.loads(line)
            if "event" in msg:
                continue
            if "error" in msg:
                raise GuestError(f"QMP: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return", msg.get("QMP"))

    def _ga_sync(self, timeout: float) -> _JsonSocket:
        """A guest agent connection, synchronised with guest-sync-delimited (retried)."""
        deadline = time.monotonic() + timeout
        if self._qga is None:
            self._qga = _JsonSocket(self.qga_path, 10)
        while True:
            token = random.randrange(1, 2**31)
            self._qga.send({"execute": "guest-sync-delimited", "arguments": {"id": token}}, b"\xff")
            step = min(deadline, time.monotonic() + 2)
            while self._qga.read_until(b"\xff", step) is not None:
                line = self._qga.read_until(b"\n", step)
                if line is not None and json.loads(line).get("return") == token:
                    return self._qga
            if time.monotonic() > deadline:
                raise GuestError(f"guest agent: no answer to guest-sync within {timeout} s")
            if self.proc is None or self.proc.poll() is not None:
                raise GuestError(f"guest agent: QEMU exited{self._tail()}")

    def ga(self, command: str, timeout: float = 60.0, **arguments: Any) -> Any:
        """Run a guest agent command; its return value (None for commands without a reply)."""
        sock = self._ga_sync(timeout)
        sock.send({"execute": command, "arguments": arguments})
        if command in ("guest-shutdown", "guest-suspend-disk", "guest-suspend-ram"):
            return None
        line = sock.read_until(b"\n", time.monotonic() + timeout)
        if line is None:
            raise GuestError(f"guest agent: no reply to {command} within {timeout} s")
        msg = json.loads(line.lstrip(b"\xff"))
        if "error" in msg:
            raise GuestError(f"guest agent: {command}: {msg['error'].get('desc', msg['error'])}")
        return msg.get("return")

    def ga_ping(self, timeout: float = 60.0) -> None:
        """Wait until the guest agent answers guest-ping."""
        self.ga("guest-ping", timeout=timeout)

    def exec(self, argv: Sequence[str], stdin: bytes = b"", timeout: float = 60.0) -> ExecResult:
        """Run `argv` in the guest with guest-exec and wait for it."""
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.ga("guest-exec", timeout=timeout, **args)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.ga("guest-exec-status", timeout=timeout, pid=pid)
            if status["exited"]:
                return ExecResult(
                    status.get("exitcode", -status.get("signal", 0)),
                    base64.b64decode(status.get("out-data", "")),
                    base64.b64decode(status.get("err-data", "")),
                )
            if time.monotonic() > deadline:
                raise GuestError(f"guest-exec {argv}: still running after {timeout} s")
            time.sleep(0.05)

    def sh(self, script: str, timeout: float = 60.0) -> str:
        """Run a shell script in the guest; its stdout. Fails on a non-zero exit."""
        res = self.exec(["/bin/sh", "-c", script], timeout=timeout)
        if res.exitcode != 0:
            raise GuestError(f"guest sh {script!r}: exit {res.exitcode}: {res.stderr.decode()}")
        return res.stdout.decode()

    def write_file(self, path: str, data: bytes) -> None:
        """Write `data` to `path` in the guest (parents made) and sync."""
        res = self.exec(["/usr/bin/sv-write", path], stdin=data)
        if res.exitcode != 0:
            raise GuestError(f"guest write {path}: exit {res.exitcode}: {res.stderr.decode()}")

    def stop(self, timeout: float = 10.0) -> None:
        """End QEMU: QMP quit (images closed cleanly), SIGKILL if it lingers. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(GuestError, OSError, ValueError):
                self.qmp("quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_sockets()

    def kill(self) -> None:
        """SIGKILL QEMU (a crash, as far as the disks are concerned) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._qmp, self._qga):
            if sock is not None:
                sock.close()
        self._qmp = self._qga = None

    def cleanup(self) -> None:
        """Stop QEMU and remove the run folder (sockets; the log too unless given)."""
        self.stop()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> GuestVM:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
