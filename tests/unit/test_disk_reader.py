"""DiskReader: a disk of a snapshot read as a file, through the chunk cache and read-ahead."""

from __future__ import annotations

import io
import os
import random
import threading
import time
from collections.abc import Iterator

import pytest

from stratavault.errors import ChunkNotFoundError, DataDamagedError
from stratavault.jobs import DiskReader
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import DiskIndex
from stratavault.storage import MemoryStorage
from stratavault.types import BlobKind, ChunkId

CHUNK = 64 << 10


@pytest.fixture
def repo() -> Iterator[Repository]:
    repository = Repository.init(
        MemoryStorage(), b"pw", cache_dir=None, kdf=KdfParams.fast(), pack_target_bytes=1 << 20
    )
    yield repository
    repository.close()


def _disk(
    repo: Repository, size: int, *, seed: int = 3, zero_share: float = 0.3
) -> tuple[DiskIndex, bytes]:
    """A disk of random chunks, some zero, one chunk repeated, a short last chunk."""
    rng = random.Random(seed)
    index = DiskIndex("vda", size, CHUNK)
    image = bytearray(size)
    repeated = rng.randbytes(CHUNK)
    for number in range(index.chunk_count):
        start, end = index.chunk_range(number)
        if rng.random() < zero_share:
            continue
        data = repeated if number % 7 == 3 and end - start == CHUNK else rng.randbytes(end - start)
        image[start:end] = data
        cid = repo.chunk_id(data)
        if not repo.has_chunk(cid):
            repo.add_chunk(cid, data, BlobKind.DATA)
        index.put(number, cid)
    repo.flush()
    return index, bytes(image)


def test_random_reads_match_the_image(repo: Repository) -> None:
    size = 40 * CHUNK + 1234
    index, image = _disk(repo, size)
    with DiskReader(repo, index, cache_bytes=8 * CHUNK, readahead_bytes=4 * CHUNK) as reader:
        assert reader.size == size
        rng = random.Random(5)
        for _ in range(300):
            offset = rng.randrange(size + 10)
            length = rng.choice([1, 511, 4096, CHUNK, 3 * CHUNK + 17, rng.randrange(9 * CHUNK)])
            assert reader.read_at(offset, length) == image[offset : offset + length]
            buffer = bytearray(length)
            n = reader.readinto_at(offset, buffer)
            assert bytes(buffer[:n]) == image[offset : offset + length]


def test_file_protocol(repo: Repository) -> None:
    index, image = _disk(repo, 10 * CHUNK + 100)
    reader = DiskReader(repo, index)
    assert reader.readable() and reader.seekable() and not reader.writable()
    assert reader.read(10) == image[:10]
    assert reader.tell() == 10
    assert reader.seek(-5, io.SEEK_CUR) == 5
    assert reader.read(CHUNK) == image[5 : 5 + CHUNK]
    assert reader.seek(-100, io.SEEK_END) == len(image) - 100
    assert reader.read() == image[-100:]
    assert reader.read(10) == b""
    reader.seek(len(image) + 50)
    assert reader.read(10) == b""
    reader.seek(0)
    assert reader.read() == image
    with pytest.raises(ValueError, match="negative"):
        reader.seek(-1)
    # io wrappers work on it (readinto), as they do on a real file.
    reader.seek(0)
    assert io.BufferedReader(reader, 1 << 20).read(3 * CHUNK) == image[: 3 * CHUNK]
    reader.close()
    with pytest.raises(ValueError):
        reader.read_at(0, 1)


def test_zero_chunks_are_never_fetched_and_repeats_once(repo: Repository) -> None:
    index = DiskIndex("vdb", 64 * CHUNK, CHUNK)
    data = os.urandom(CHUNK)
    cid = repo.chunk_id(data)
    repo.add_chunk(cid, data, BlobKind.DATA)
    repo.flush()
    for number in (10, 20, 30):
        index.put(number, cid)
    reader = DiskReader(repo, index, readahead_bytes=0)
    assert reader.read_at(CHUNK + 5, 8 * CHUNK) == bytes(8 * CHUNK)
    assert reader.chunks_fetched == 0
    assert reader.read_at(10 * CHUNK, CHUNK) == data
    assert reader.read_at(20 * CHUNK, CHUNK) == data
    assert reader.read_at(30 * CHUNK - 1, 2) == b"\0" + data[:1]
    assert reader.chunks_fetched == 1  # one chunk held three times is read once


def test_cache_is_bounded_and_reused(repo: Repository) -> None:
    index, image = _disk(repo, 32 * CHUNK, zero_share=0)
    distinct = len(index.chunk_ids())
    small = DiskReader(repo, index, cache_bytes=4 * CHUNK, readahead_bytes=0)
    for _ in range(2):
        for number in range(32):
            small.read_at(number * CHUNK + 7, 100)  # never sequential: no read-ahead
    assert small.chunks_fetched >= 2 * (distinct - 4)
    assert len(small._cache) <= 4
    big = DiskReader(repo, index, cache_bytes=64 * CHUNK, readahead_bytes=0)
    for _ in range(2):
        for number in range(32):
            assert big.read_at(number * CHUNK + 7, 100) == image[number * CHUNK + 7 :][:100]
    assert big.chunks_fetched == distinct


def test_sequential_reads_fetch_ahead(repo: Repository) -> None:
    index, image = _disk(repo, 32 * CHUNK, zero_share=0)
    reader = DiskReader(repo, index, readahead_bytes=8 * CHUNK)
    assert reader.read(4096) == image[:4096]
    assert reader.read(4096) == image[4096:8192]
    deadline = time.monotonic() + 5
    while reader.chunks_fetched < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader.chunks_fetched >= 6  # the next chunks came before they were asked for
    # A random reader far away does not trigger read-ahead.
    random_reader = DiskReader(repo, index, readahead_bytes=8 * CHUNK)
    random_reader.read_at(17 * CHUNK + 99, 10)
    time.sleep(0.1)
    assert random_reader.chunks_fetched == 1
    reader.seek(0)
    assert reader.read() == image
    reader.close()


def test_concurrent_readers(repo: Repository) -> None:
    size = 48 * CHUNK + 999
    index, image = _disk(repo, size)
    reader = DiskReader(repo, index, cache_bytes=6 * CHUNK, readahead_bytes=3 * CHUNK)
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            pos = rng.randrange(size)
            for _ in range(150):
                if rng.random() < 0.3:
                    pos = rng.randrange(size)
                length = rng.randrange(1, 2 * CHUNK)
                assert reader.read_at(pos, length) == image[pos : pos + length]
                pos += length
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert errors == []


def test_missing_chunk_fails_when_read_naming_it(repo: Repository) -> None:
    index, image = _disk(repo, 8 * CHUNK, zero_share=0)
    ghost = ChunkId(os.urandom(32))
    index.put(5, ghost)
    reader = DiskReader(repo, index)
    assert reader.read_at(0, 5 * CHUNK) == image[: 5 * CHUNK]  # read-ahead met it: no error yet
    with pytest.raises(ChunkNotFoundError, match=ghost.hex()):
        reader.read_at(5 * CHUNK, 10)
    with pytest.raises(DataDamagedError):  # again, not a hang nor a cached failure
        reader.read_at(5 * CHUNK + 1, 10)
    assert reader.read_at(6 * CHUNK, CHUNK) == image[6 * CHUNK :][:CHUNK]
    reader.close()
