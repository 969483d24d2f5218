"""Our NBD server with our client: several clients, writes, backend errors, concurrency."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from stratavault.errors import NbdError
from stratavault.nbd import BASE_ALLOCATION, NbdServer, connect

MiB = 1024 * 1024


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
        assert time.monotonic() - start < 4


class SlowBackend(FlakyBackend):
    """Reads take 0.1 s each; the first byte of each 4 KiB block is its number."""

    def __init__(self) -> None:
        super().__init__()
        for block in range(MiB // 4096):
            self.data[block * 4096] = block % 256

    def read(self, offset: int, length: int) -> bytes:
        time.sleep(0.1)
        return bytes(self.data[offset : offset + length])


@pytest.mark.parametrize("workers", [1, 4])
def test_workers_run_a_client_s_requests_concurrently(workers: int) -> None:
    backend = SlowBackend()
    with (
        NbdServer({"": backend}, host="127.0.0.1", workers=workers) as server,
        connect(server.address, in_flight=8, request_bytes=4096, timeout_s=5) as client,
    ):
        start = time.monotonic()
        data = client.read(0, 8 * 4096)
        elapsed = time.monotonic() - start
        assert data == bytes(backend.data[: 8 * 4096])
        client.flush()
    if workers == 1:
        assert elapsed >= 0.8
    else:
        assert elapsed < 0.7, f"8 reads of 0.1 s on 4 workers took {elapsed:.2f} s"
