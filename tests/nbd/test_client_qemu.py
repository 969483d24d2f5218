"""The NBD client against real servers: qemu-nbd (raw, qcow2) and qemu-storage-daemon with a
dirty bitmap. Content is byte-compared, extents compared with qemu-img map and nbdinfo."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from stratavault.errors import NbdError
from stratavault.nbd import BASE_ALLOCATION, NbdAddress, connect, list_exports, list_meta_contexts

from .conftest import Peers, merge, nbdinfo_map, need, qemu_img_map, run, write_random

pytestmark = pytest.mark.infra("qemu")
MiB = 1024 * 1024


def sparse_raw(path: Path, size: int = 64 * MiB) -> bytes:
    """A sparse raw image with data in a few places; returns its full content."""
    with path.open("wb") as f:
        f.truncate(size)
    write_random(path, 0, 70_000, seed=1)  # unaligned end
    write_random(path, 5 * MiB, 3 * MiB, seed=2)
    write_random(path, size - MiB, MiB, seed=3)
    return path.read_bytes()


def test_raw_content_and_allocation_match_qemu(tmp_path: Path, peers: Peers) -> None:
    need("qemu-nbd", "qemu-img")
    image = tmp_path / "disk.raw"
    content = sparse_raw(image)
    sock = peers.qemu_nbd(image, "raw")
    with connect(sock, "disk", meta_contexts=[BASE_ALLOCATION, "qemu:nothing"]) as client:
        assert client.size == len(content)
        assert client.read_only
        assert client.contexts == {BASE_ALLOCATION: client.contexts[BASE_ALLOCATION]}
        assert client.read(0, client.size) == content
        assert client.read(69_990, 20) == content[69_990:70_010]
        buf = bytearray(3 * MiB + 5)
        client.read_into(5 * MiB - 3, buf)
        assert bytes(buf) == content[5 * MiB - 3 : 8 * MiB + 2]
        ranges = [(at, n) for at in range(0, 8 * MiB, 97_000) for n in (1, 65_536, 700_001)]
        got = client.read_ranges(ranges)  # 260 ranges, the long ones in several requests
        assert [bytes(b) for b in got] == [content[at : at + n] for at, n in ranges]
        with pytest.raises(NbdError, match="outside the export"):
            client.read_ranges([(0, 1), (client.size, 1)])
        ours = merge((e.offset, e.length, e.flags) for e in client.extents())
        assert ours == qemu_img_map(image, "raw")
        with pytest.raises(NbdError, match="read-only"):
            client.write(0, b"x")
        with pytest.raises(NbdError, match="outside the export"):
            client.read(client.size - 1, 2)
        assert client.block_status(4096, 0) == []
        with pytest.raises(NbdError, match="not negotiated"):
            client.block_status(0, 4096, "qemu:dirty-bitmap:x")


def test_qcow2_with_holes_and_zero_clusters(tmp_path: Path, peers: Peers) -> None:
    need("qemu-nbd", "qemu-img", "qemu-io")
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "40M")
    run(
        "qemu-io", "-f", "qcow2",
        "-c", "write -P 0x11 1M 3M",
        "-c", "write -z 8M 2M",
        "-c", "write -P 0x22 20M 64k",
        "-c", "write -P 0x33 39M 1M",
        image,
    )  # fmt: skip
    raw = tmp_path / "flat.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw)
    sock = peers.qemu_nbd(image, "qcow2")
    uri = f"nbd+unix:///disk?socket={sock}"
    with connect(uri, meta_contexts=[BASE_ALLOCATION]) as client:
        assert client.export == "disk"
        data = client.read(0, client.size)
        assert hashlib.sha256(data).digest() == hashlib.sha256(raw.read_bytes()).digest()
        ours = merge((e.offset, e.length, e.flags) for e in client.extents())
        assert ours == qemu_img_map(image, "qcow2")
        assert ours == nbdinfo_map(uri)
        assert (8 * MiB, 2 * MiB, 3) in ours or any(
            f == 3 and o <= 8 * MiB and o + n >= 10 * MiB for o, n, f in ours
        )
        # a partial window of the disk
        window = list(client.extents(offset=MiB + 5, length=MiB))
        assert window[0].offset == MiB + 5 and window[-1].end == 2 * MiB + 5
    assert list_exports(sock) == [("disk", "")]
    assert BASE_ALLOCATION in list_meta_contexts(sock, "disk")


def test_dirty_bitmap_from_storage_daemon(tmp_path: Path, peers: Peers) -> None:
    need("qemu-img", "qemu-io", "qemu-storage-daemon", "nbdinfo")
    image = tmp_path / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x01 0 8M", image)
    run("qemu-img", "bitmap", "--add", "--granularity", "65536", image, "bm0")
    run(
        "qemu-io", "-f", "qcow2",
        "-c", "write -P 0x02 1M 64k",
        "-c", "write -P 0x03 3M 100k",
        "-c", "write -P 0x04 30M 4k",
        image,
    )  # fmt: skip
    run("qemu-img", "bitmap", "--disable", image, "bm0")
    sock = peers.storage_daemon(image, export="vda", bitmap="bm0")
    uri = f"nbd+unix:///vda?socket={sock}"
    context = "qemu:dirty-bitmap:bm0"
    with connect(NbdAddress.parse(uri), meta_contexts=[BASE_ALLOCATION, context]) as client:
        assert set(client.contexts) == {BASE_ALLOCATION, context}
        dirty = merge((e.offset, e.length, e.flags) for e in client.extents(context))
        assert dirty == nbdinfo_map(uri, context)
        assert [(o, n) for o, n, f in dirty if f & 1] == [
            (MiB, 64 * 1024),
            (3 * MiB, 128 * 1024),
            (30 * MiB, 64 * 1024),
        ]
        alloc = merge((e.offset, e.length, e.flags) for e in client.extents())
        assert alloc == nbdinfo_map(uri)
        assert client.read(3 * MiB, 100 * 1024) == b"\x03" * 100 * 1024


def test_unknown_export_is_a_clear_error(tmp_path: Path, peers: Peers) -> None:
    need("qemu-nbd")
    image = tmp_path / "d.raw"
    sparse_raw(image, MiB)
    sock = peers.qemu_nbd(image, "raw")
    with pytest.raises(NbdError, match=r"'nope'.*refused NBD_OPT_GO"):
        connect(sock, "nope", timeout_s=5)
    with pytest.raises(NbdError, match="connecting to NBD server"):
        connect(tmp_path / "missing.sock", timeout_s=5)


def test_sequential_read_throughput(
    tmp_path: Path, peers: Peers, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 GiB sparse raw with 256 MiB of random data, read whole through qemu-nbd."""
    need("qemu-nbd")
    image = tmp_path / "big.raw"
    with image.open("wb") as f:
        f.truncate(1024 * MiB)
        f.seek(128 * MiB)
        for _ in range(256):
            f.write(os.urandom(MiB))
    sock = peers.qemu_nbd(image, "raw")
    with connect(sock, "disk") as client:
        buf = bytearray(64 * MiB)
        start = time.perf_counter()
        for offset in range(0, client.size, len(buf)):
            client.read_into(offset, buf)
        whole_s = time.perf_counter() - start
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            for offset in range(128 * MiB, 384 * MiB, len(buf)):
                client.read_into(offset, buf)
            rates.append(256 / (time.perf_counter() - start))
    with capsys.disabled():
        print(
            f"\nNBD client from qemu-nbd: whole 1 GiB disk {1024 / whole_s:.0f} MiB/s, "
            f"256 MiB data region {', '.join(f'{r:.0f}' for r in rates)} MiB/s"
        )
    assert max(rates) > 25, "reading data through the NBD client is far too slow"  # ~1 GiB/s here


def test_writes_trim_and_zeroes_to_qemu_nbd(tmp_path: Path, peers: Peers) -> None:
    need("qemu-nbd", "qemu-img")
    image = tmp_path / "w.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
    sock = peers.qemu_nbd(image, "qcow2", extra=("--discard=unmap",), read_only=False)
    expected = bytearray(16 * MiB)
    with connect(sock, "disk", meta_contexts=[BASE_ALLOCATION], request_bytes=MiB) as client:
        assert not client.read_only
        payload = os.urandom(5 * MiB + 123)
        client.write(100, payload)
        expected[100 : 100 + len(payload)] = payload
        client.write_zeroes(MiB, MiB, no_hole=True)
        client.write_zeroes(3 * MiB, MiB)
        expected[MiB : 2 * MiB] = bytes(MiB)
        expected[3 * MiB : 4 * MiB] = bytes(MiB)
        client.trim(4 * MiB, 64 * 1024)
        expected[4 * MiB : 4 * MiB + 64 * 1024] = bytes(64 * 1024)
        scattered = [(at, os.urandom(n)) for at, n in [(9 * MiB, 65_536), (7 * MiB + 1, 3 * MiB)]]
        client.write_ranges(scattered)  # the 3 MiB one in three requests, all pipelined
        for at, data in scattered:
            expected[at : at + len(data)] = data
        with pytest.raises(NbdError, match="outside the export"):
            client.write_ranges([(0, b"x"), (16 * MiB, b"y")])
        client.flush()
        assert client.read(0, client.size) == bytes(expected)
        zeroed = [e for e in client.extents() if e.flags & 2]
        assert any(e.offset <= 3 * MiB and e.end >= 4 * MiB for e in zeroed)
    peers.stop()
    flat = tmp_path / "flat.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, flat)
    assert flat.read_bytes() == bytes(expected)
