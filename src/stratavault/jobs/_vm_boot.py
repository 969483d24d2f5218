"""Booting a backed-up VM straight from served disks: qcow2 overlays on NBD exports, the
stored QEMU command line pointed at them, and QEMU started detached. Shared by instant
recovery and ``verify --boot``."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stratavault.errors import RestoreError, SourceError
from stratavault.sources import QmpSession

__all__ = [
    "boot_command",
    "disk_files",
    "make_overlays",
    "original_formats",
    "process_alive",
    "read_pid",
    "start_qemu",
    "vm_command",
    "wait_gone",
    "without_network",
]

_NETWORK_OPTIONS = ("-netdev", "-nic", "-net")
_SOCKET_OPTIONS = ("-chardev", "-monitor", "-serial", "-vnc")
_DROPPED_FLAGS = ("-daemonize",)
_DROPPED_WITH_VALUE = ("-pidfile", "-qmp", "-qmp-pretty")
"""The original's own QMP monitors go: the restored VM gets ``run_dir/qmp.sock``."""


def _rewrite_socket_paths(arg: str, run_dir: Path) -> str:
    """Point unix sockets and files of a monitor/chardev option into ``run_dir``."""
    arg = re.sub(r"(path=)([^,]+)", lambda m: m[1] + str(run_dir / Path(m[2]).name), arg)
    arg = re.sub(r"(unix:)([^,]+)", lambda m: m[1] + str(run_dir / Path(m[2]).name), arg)
    return re.sub(r"(file:)([^,]+)", lambda m: m[1] + str(run_dir / Path(m[2]).name), arg)


def vm_command(
    config: Mapping[str, Any],
    disks: Mapping[str, Path],
    name: str,
    run_dir: Path,
    formats: Mapping[str, str] | None = None,
) -> list[str]:
    """The stored QEMU command line with the restored disks in place of the original
    images (opened in their format in ``formats``, by disk, when given), the new name,
    its monitors and consoles in ``run_dir`` (plus a QMP socket ``run_dir/qmp.sock``),
    and no ``-daemonize``/``-pidfile``."""
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
    new_formats = {str(disks[d]): f for d, f in (formats or {}).items() if d in disks}
    rewritten = []
    for arg in out:
        for old, new in files.items():
            if old in arg:
                arg = arg.replace(old, str(new))
                if str(new) in new_formats:
                    arg = _with_format(arg, new_formats[str(new)])
        rewritten.append(arg)
    if "-name" not in rewritten:
        rewritten += ["-name", name]
    return [*rewritten, "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off"]


def make_overlays(
    uris: Mapping[str, str], sizes: Mapping[str, int], folder: Path
) -> dict[str, Path]:
    """A qcow2 overlay in ``folder`` per disk, backed by its NBD export (raw): the guest's
    writes stay local, the export is only read."""
    overlays: dict[str, Path] = {}
    for name, uri in uris.items():
        path = folder / f"{Path(name).stem or 'disk'}-instant.qcow2"
        cmd = ["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", uri, "-F", "raw",
               str(path), str(sizes[name])]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RestoreError(f"creating the overlay {path} on {uri} - {done.stderr.strip()}")
        overlays[name] = path
    return overlays


_IMAGE_DRIVERS = "raw|qcow2|qcow|vmdk|vhdx|vdi|vpc|qed|parallels|dmg|cloop"


def _with_format(arg: str, fmt: str) -> str:
    """An option that names a disk file opens it as ``fmt`` (``format=``, or a format
    ``driver=``; a protocol driver such as ``driver=file`` stays)."""
    arg = re.sub(rf"(^|,)driver=(?:{_IMAGE_DRIVERS})(?=,|$)", rf"\1driver={fmt}", arg)
    return re.sub(r"(^|,)format=[^,]*", rf"\1format={fmt}", arg)


def original_formats(config: Mapping[str, Any]) -> dict[str, str]:
    """Disk -> its image format, as the snapshot's configuration recorded it (raw if not)."""
    return {str(d["device"]): str(d.get("format", "raw")) for d in config.get("disks", [])}


def disk_files(folder: Path, formats: Mapping[str, str]) -> dict[str, Path]:
    """A file in ``folder`` for each disk (name -> format): the name's stem with the
    format as suffix, numbered when two disks would share one (``a.qcow2`` and ``a.raw``
    restored as raw: ``a.raw`` and ``a-2.raw``)."""
    files: dict[str, Path] = {}
    for disk, fmt in formats.items():
        stem = Path(disk).stem or "disk"
        path, n = folder / f"{stem}.{fmt}", 1
        while path in files.values():
            n += 1
            path = folder / f"{stem}-{n}.{fmt}"
        files[disk] = path
    return files


def without_network(argv: list[str], *, drop: tuple[str, ...] = ()) -> list[str]:
    """The command line with no network: every -netdev/-nic/-net option and NIC device
    (and the options in ``drop``) out, ``-nic none`` in."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in (*_NETWORK_OPTIONS, *drop):
            next(args, None)
            continue
        if arg == "-device":
            value = next(args, "")
            if "netdev=" not in value:
                out += [arg, value]
            continue
        out.append(arg)
    return [*out, "-nic", "none"]


def _isolate(argv: list[str], console: Path) -> list[str]:
    """No network and one serial console into ``console``."""
    return [*without_network(argv, drop=("-serial",)), "-serial", f"file:{console}"]


def boot_command(
    config: Mapping[str, Any],
    overlays: Mapping[str, Path],
    name: str,
    run_dir: Path,
    *,
    console: Path | None = None,
) -> list[str]:
    """The stored command line on the overlays (see ``vm_command``), with ``-pidfile
    run_dir/qemu.pid``; with ``console``, isolated: no network, serial console to that file."""
    argv = vm_command(config, overlays, name, run_dir, dict.fromkeys(overlays, "qcow2"))
    if console is not None:
        argv = _isolate(argv, console)
    return [*argv, "-pidfile", str(run_dir / "qemu.pid")]


def start_qemu(
    command: list[str], run_dir: Path, *, timeout_s: float = 30.0
) -> subprocess.Popen[bytes]:
    """Start QEMU in its own session (it outlives this process), wait for its QMP socket
    ``run_dir/qmp.sock`` and let it run when it starts paused."""
    log = (run_dir / "qemu.log").open("ab")
    try:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    except OSError as exc:
        raise SourceError(f"starting QEMU for {run_dir} - {exc.strerror or exc}") from exc
    finally:
        log.close()
    qmp = run_dir / "qmp.sock"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = (run_dir / "qemu.log").read_text(errors="replace")[-800:]
            raise SourceError(f"starting QEMU for {run_dir} - it exited: {tail.strip()}")
        with contextlib.suppress(SourceError):
            with QmpSession(qmp, timeout_s=5) as session:
                if session.execute("query-status").get("status") in ("prelaunch", "paused"):
                    session.execute("cont")
            return proc
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SourceError(f"starting QEMU for {run_dir} - no QMP socket after {timeout_s:g} s")
        time.sleep(0.05)


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None when absent or unreadable."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` is gone; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return True
