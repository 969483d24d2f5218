"""Helpers for the NBD tests: real NBD peers (qemu-nbd, qemu-storage-daemon) and images."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from stratavault.nbd import FileBackend, NbdServer
from tests.sockets import wait_for_socket

QEMU_TOOLS = ("qemu-img", "qemu-nbd", "qemu-io", "qemu-storage-daemon", "nbdinfo")


def need(*tools: str) -> None:
    """Skip (a failure under CI) when a tool is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")


def run(*args: str | Path) -> str:
    """Run a command, fail the test with its stderr if it fails; return stdout."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


class Peers:
    """Starts NBD server processes and stops them all at the end of a test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, args: list[str], sock: Path) -> Path:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        wait_for_socket(sock, proc)
        return sock

    def qemu_nbd(
        self,
        image: Path,
        fmt: str,
        *,
        export: str = "disk",
        extra: tuple[str, ...] = (),
        read_only: bool = True,
    ) -> Path:
        """qemu-nbd serving ``image`` on a unix socket (many clients allowed)."""
        sock = self.tmp / f"qnbd-{len(self.procs)}.sock"
        args = ["qemu-nbd", "-f", fmt, "-k", str(sock), "-x", export, "-e", "4", "-t"]
        args += ["-r"] if read_only else []
        return self._start([*args, *extra, str(image)], sock)

    def storage_daemon(self, qcow2: Path, *, export: str, bitmap: str) -> Path:
        """qemu-storage-daemon exporting a qcow2 read-only with one dirty bitmap."""
        sock = self.tmp / f"qsd-{len(self.procs)}.sock"
        args = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={qcow2},read-only=on",
            "--blockdev",
            "driver=qcow2,node-name=d0,file=f0,read-only=on",
            "--nbd-server",
            f"addr.type=unix,addr.path={sock}",
            "--export",
            f"type=nbd,id=e0,node-name=d0,name={export},writable=off,bitmaps.0={bitmap}",
        ]
        return self._start(args, sock)

    def stop(self) -> None:
        """Terminate every process started."""
        procs, self.procs = self.procs, []
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    """Real NBD server processes, stopped after the test."""
    started = Peers(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def write_random(path: Path, offset: int, length: int, seed: int) -> bytes:
    """Write deterministic random bytes into a file at ``offset``; return them."""
    data = random.Random(seed).randbytes(length)
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)
    return data


def qemu_img_map(image: Path, fmt: str) -> list[tuple[int, int, int]]:
    """``qemu-img map --output=json`` as (offset, length, base:allocation flags), merged."""
    out = json.loads(run("qemu-img", "map", "--output=json", "-f", fmt, image))
    return merge(
        (e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0)) for e in out
    )


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    """``nbdinfo --map=CONTEXT`` as (offset, length, flags), merged."""
    out = run("nbdinfo", f"--map={context}", uri)
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return merge((int(r[0]), int(r[1]), int(r[2])) for r in rows)


def merge(extents: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join neighbours with the same flags."""
    merged: list[tuple[int, int, int]] = []
    for off, n, flags in extents:
        if merged and merged[-1][2] == flags and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n, flags)
        else:
            merged.append((off, n, flags))
    return merged


MiB = 1024 * 1024


def make_disk(path: Path, size: int = 48 * MiB) -> bytes:
    """A sparse raw disk with random data in three places; returns its content."""
    with path.open("wb") as f:
        f.truncate(size)
    write_random(path, 100, 200_000, seed=11)
    write_random(path, 16 * MiB, 4 * MiB + 3, seed=12)
    write_random(path, size - 4096, 4096, seed=13)
    return path.read_bytes()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NbdServer, Path, Path]]:
    """Our server with a read-only export "ro" (a sparse disk) and a writable 8 MiB "rw"."""
    source, target = tmp_path / "source.raw", tmp_path / "target.raw"
    make_disk(source)
    with target.open("wb") as f:
        f.truncate(8 * MiB)
    server = NbdServer(
        {"ro": FileBackend(source), "rw": FileBackend(target, read_only=False)},
        unix_path=tmp_path / "our.sock",
    )
    server.start()
    yield server, source, target
    server.close()
