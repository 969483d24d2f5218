"""Our NBD server read and written by real peers: qemu-img, nbdinfo, qemu-io and QEMU."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from stratavault.errors import NbdError
from stratavault.nbd import BASE_ALLOCATION, FileBackend, NbdServer, connect

from .conftest import nbdinfo_map, need, qemu_img_map, run, wait_for_socket, write_random

pytestmark = pytest.mark.infra("qemu")
MiB = 1024 * 1024


def make_disk(path: Path, size: int = 48 * MiB) -> bytes:
    with path.open("wb") as f:
        f.truncate(size)
    write_random(path, 100, 200_000, seed=11)
    write_random(path, 16 * MiB, 4 * MiB + 3, seed=12)
    write_random(path, size - 4096, 4096, seed=13)
    return path.read_bytes()


@pytest.fixture
def served(tmp_path: Path) -> tuple[NbdServer, Path, Path]:
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


def test_qemu_img_convert_compare_and_nbdinfo(
    tmp_path: Path, served: tuple[NbdServer, Path, Path]
) -> None:
    need("qemu-img", "nbdinfo")
    server, source, _ = served
    uri = server.uri("ro")
    run("qemu-img", "compare", "-f", "raw", source, uri)
    copy = tmp_path / "copy.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", uri, copy)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, copy)
    assert int(run("nbdinfo", "--size", uri)) == source.stat().st_size
    assert nbdinfo_map(uri) == qemu_img_map(source, "raw")
    listed = run("nbdinfo", "--list", "--json", server.uri())
    assert '"export-name": "ro"' in listed and '"export-name": "rw"' in listed
    info = run("nbdinfo", "--json", uri)
    assert '"is_read_only": true' in info


def test_qemu_io_writes_to_a_writable_export(served: tuple[NbdServer, Path, Path]) -> None:
    need("qemu-io")
    server, _, target = served
    uri = server.uri("rw")
    run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 1M 64k",
        "-c", "write -P 0xcd 2M 1M",
        "-c", "write -z 2M 4k",
        "-c", "write -z -u 2560k 64k",
        "-c", "discard 2816k 64k",
        "-c", "flush",
        uri,
    )  # fmt: skip
    data = target.read_bytes()
    assert data[MiB : MiB + 65536] == b"\xab" * 65536
    assert data[2 * MiB : 2 * MiB + 4096] == bytes(4096)
    assert data[2 * MiB + 4096 : 2560 * 1024] == b"\xcd" * (512 * 1024 - 4096)
    assert data[2560 * 1024 : 2624 * 1024] == bytes(64 * 1024)
    assert data[2624 * 1024 : 2816 * 1024] == b"\xcd" * (192 * 1024)
    assert data[2816 * 1024 : 2880 * 1024] == bytes(64 * 1024)
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 1M 64k", uri)
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", server.uri("ro")],
        capture_output=True,
        text=True,
    )
    assert "write failed" in out.stderr + out.stdout or out.returncode != 0


def test_qemu_system_reads_and_writes_through_our_server(
    tmp_path: Path, served: tuple[NbdServer, Path, Path]
) -> None:
    need("qemu-system-x86_64")
    from qemu.qmp.legacy import QEMUMonitorProtocol

    server, _, target = served
    with target.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x3c" * 65536)
    qmp_path, log = tmp_path / "vm.qmp", tmp_path / "vm.log"
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                "qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-m", "64M",
                "-nodefaults", "-display", "none", "-no-user-config", "-S",
                "-qmp", f"unix:{qmp_path},server=on,wait=off",
                "-blockdev",
                f"driver=nbd,node-name=n0,server.type=unix,server.path={server.address},export=rw",
                "-device", "virtio-blk-pci,drive=n0,id=vda",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_socket(qmp_path, proc)
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        dev = "/machine/peripheral/vda/virtio-backend"
        # qemu-io run through HMP prints its results on QEMU's stdout (the log)
        for command in (
            "write -P 0x5a 3M 64k",
            "read -P 0x5a 3M 64k",
            "read -P 0x3c 5M 64k",
            "read -P 0x77 5M 64k",
            "flush",
        ):
            qmp.cmd("human-monitor-command", **{"command-line": f'qemu-io -d {dev} "{command}"'})
        qmp.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    text = log.read_text()
    assert "wrote 65536/65536 bytes at offset 3145728" in text
    assert text.count("read 65536/65536") == 3
    assert text.count("Pattern verification failed") == 1
    assert "Pattern verification failed at offset 5242880" in text
    assert target.read_bytes()[3 * MiB : 3 * MiB + 65536] == b"\x5a" * 65536


def test_several_clients_at_once(served: tuple[NbdServer, Path, Path]) -> None:
    server, source, _ = served
    content = source.read_bytes()
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            with connect(server.uri("ro"), meta_contexts=[BASE_ALLOCATION], in_flight=4) as c:
                for i in range(20):
                    offset = (seed * 7919 + i * 104729) % (c.size - MiB)
                    assert c.read(offset, MiB) == content[offset : offset + MiB]
                assert sum(e.length for e in c.extents()) == c.size
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def test_client_write_trim_zero_flush_round_trip(served: tuple[NbdServer, Path, Path]) -> None:
    server, _, target = served
    with connect(server.address, "rw", meta_contexts=[BASE_ALLOCATION], request_bytes=MiB) as c:
        assert not c.read_only
        payload = os.urandom(3 * MiB + 17)
        c.write(1000, payload, fua=True)
        c.flush()
        assert c.read(1000, len(payload)) == payload
        c.write_zeroes(MiB, MiB, no_hole=True)
        c.trim(2 * MiB, MiB)
        c.write_zeroes(3 * MiB, 4096)
        expected = bytearray(bytes(1000) + payload)
        expected[MiB : 3 * MiB] = bytes(2 * MiB)
        expected[3 * MiB : 3 * MiB + 4096] = bytes(4096)
        assert c.read(0, len(expected)) == bytes(expected)
        holes = [e for e in c.extents() if e.flags & 1]
        assert any(e.offset <= 2 * MiB and e.end >= 3 * MiB for e in holes)
        with pytest.raises(NbdError, match="outside the export"):
            c.write(c.size - 1, b"ab")
    assert target.read_bytes()[: len(expected)] == bytes(expected)


class FlakyBackend:
    """A 1 MiB in-memory disk whose reads fail with EIO in its second half."""

    size_bytes = MiB
    read_only = False

    def __init__(self) -> None:
        self.data = bytearray(MiB)

    def read(self, offset: int, length: int) -> bytes:
        if offset == 12345:
            raise ValueError("a bug in the backend")
        if offset + length > MiB // 2:
            raise OSError(errno.EIO, "medium error in the test backend")
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and data.startswith(b"full"):
            raise OSError(errno.ENOSPC, "no space in the test backend")
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        pass

    def trim(self, offset: int, length: int) -> None:
        self.zero(offset, length, no_hole=False)

    def zero(self, offset: int, length: int, *, no_hole: bool) -> None:
        self.data[offset : offset + length] = bytes(length)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(min(length, 4096), 0)]  # always a partial answer


def test_backend_errors_reach_the_client_and_partial_block_status(tmp_path: Path) -> None:
    with NbdServer({"": FlakyBackend()}, host="127.0.0.1", port=0) as server:
        with connect(server.address, meta_contexts=[BASE_ALLOCATION], timeout_s=5) as c:
            c.write(10, b"hello")
            assert c.read(8, 9) == b"\0\0hello\0\0"
            with pytest.raises(NbdError, match="EIO - medium error"):
                c.read(0, MiB)
            with pytest.raises(NbdError, match="ENOSPC"):
                c.write(0, b"full")
            with pytest.raises(NbdError, match="EIO - internal error: ValueError"):
                c.read(12345, 1)
            extents = list(c.extents())
            assert len(extents) == 1 and extents[0].length == MiB
            assert len(c.block_status(0, MiB)) == 1
            assert c.read(0, 16) == bytes(10) + b"hello" + bytes(1)
        with connect(server.address, structured_replies=False, timeout_s=5) as c:
            assert c.read(8, 9) == b"\0\0hello\0\0"
            with pytest.raises(NbdError, match="EIO"):
                c.read(0, MiB)
            assert c.read(10, 5) == b"hello"
            assert not c.contexts
        nbd_uri = server.uri()
        assert nbd_uri.startswith("nbd://127.0.0.1:")
        start = time.monotonic()
        with connect(nbd_uri, timeout_s=5) as c:
            assert c.size == MiB
        assert time.monotonic() - start < 2
