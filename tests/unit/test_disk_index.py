"""The disk index format: segments round-trip, damage is named, snapshots carry disks."""

from __future__ import annotations

import datetime as dt
import os
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from stratavault.errors import IntegrityError, UnsupportedFormatError
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import (
    SEGMENT_CHUNKS,
    DiskIndex,
    DiskRef,
    Snapshot,
    decode_disk_segment,
    disk_chunk_ids,
    encode_disk_segment,
    load_disk_index,
    save_disk_index,
)
from stratavault.storage import MemoryStorage
from stratavault.types import ChunkId

CHUNK = 256 << 10


def _random_index(name: str, size: int, share: float, seed: int = 1) -> DiskIndex:
    index = DiskIndex(name, size, CHUNK)
    rng = np.random.default_rng(seed)
    for number in range(index.chunk_count):
        if rng.random() < share:
            index.put(number, ChunkId(os.urandom(32)))
    return index


@pytest.fixture
def repo(tmp_path: object) -> Iterator[Repository]:
    repository = Repository.init(
        MemoryStorage(), b"pw", cache_dir=None, kdf=KdfParams.fast(), pack_target_bytes=1 << 20
    )
    yield repository
    repository.close()


def test_shape_and_short_last_chunk() -> None:
    index = DiskIndex("vda", 3 * CHUNK + 100, CHUNK)
    assert index.chunk_count == 4
    assert index.chunk_range(3) == (3 * CHUNK, 3 * CHUNK + 100)
    cid = ChunkId(os.urandom(32))
    index.put(3, cid)
    index.put(1, cid)
    assert index.get(3) == cid and index.get(0) is None
    assert index.data_bytes() == CHUNK + 100
    assert list(index.entries()) == [(1, cid), (3, cid)]
    assert index.chunk_ids() == {cid}
    index.put(3, None)
    assert index.get(3) is None


def test_segment_round_trip_is_compact() -> None:
    index = _random_index("vda", 1000 * CHUNK + 7, 0.3)
    data = encode_disk_segment(index, 0, SEGMENT_CHUNKS)
    data_chunks = int(index.data_mask().sum())
    # header + one bit per chunk + 32 bytes per data chunk: zero chunks cost one bit
    assert len(data) == 29 + -(-index.chunk_count // 8) + 32 * data_chunks
    again = DiskIndex("vda", index.size_bytes, CHUNK)
    assert decode_disk_segment(data, again, where="test") == index.chunk_count
    assert np.array_equal(again.ids, index.ids)


def test_damaged_segments_are_named() -> None:
    index = _random_index("vda", 64 * CHUNK, 0.5)
    data = encode_disk_segment(index, 0, SEGMENT_CHUNKS)
    target = DiskIndex("vda", index.size_bytes, CHUNK)
    with pytest.raises(IntegrityError, match="not a disk index segment"):
        decode_disk_segment(b"XXXX" + data[4:], target, where="seg 1")
    with pytest.raises(UnsupportedFormatError, match="version 9"):
        decode_disk_segment(data[:4] + b"\x09" + data[5:], target, where="seg 1")
    with pytest.raises(IntegrityError, match="wrong number of ids"):
        decode_disk_segment(data[:-1], target, where="seg 1")
    with pytest.raises(IntegrityError, match="another disk shape"):
        decode_disk_segment(data, DiskIndex("vda", 65 * CHUNK, CHUNK), where="seg 1")
    with pytest.raises(IntegrityError, match="truncated"):
        decode_disk_segment(data[:10], target, where="seg 1")
    past = bytearray(data)
    struct.pack_into("<Q", past, 17, 10)  # first chunk 10: goes past the end
    with pytest.raises(IntegrityError, match="past the end"):
        decode_disk_segment(bytes(past), target, where="seg 1")


def test_large_disk_spans_segments_and_unchanged_segments_keep_their_id(
    repo: Repository,
) -> None:
    size = (2 * SEGMENT_CHUNKS + 5) * CHUNK  # 32 GiB virtual, three segments
    index = _random_index("big", size, 0.01)
    ref = save_disk_index(repo, index, path="/images/big.img")
    assert len(ref.segments) == 3
    loaded = load_disk_index(repo, ref)
    assert np.array_equal(loaded.ids, index.ids)
    index.put(SEGMENT_CHUNKS + 3, ChunkId(os.urandom(32)))  # a change in the middle segment
    changed = save_disk_index(repo, index)
    assert changed.segments[0] == ref.segments[0] and changed.segments[2] == ref.segments[2]
    assert changed.segments[1] != ref.segments[1]
    ids = list(disk_chunk_ids(repo, [ref]))
    assert ids[:3] == ref.segments
    assert set(ids[3:]) == index.chunk_ids() - {index.get(SEGMENT_CHUNKS + 3)}


def test_missing_segment_is_reported(repo: Repository) -> None:
    index = _random_index("vdb", (SEGMENT_CHUNKS + 1) * CHUNK, 0.01)
    ref = save_disk_index(repo, index)
    ref.segments = ref.segments[1:]
    with pytest.raises(IntegrityError, match="starts at chunk"):
        load_disk_index(repo, ref)


def test_zero_size_disk(repo: Repository) -> None:
    index = DiskIndex("empty", 0, CHUNK)
    ref = save_disk_index(repo, index)
    assert load_disk_index(repo, ref).chunk_count == 0


def test_snapshot_document_with_disks_and_without() -> None:
    ref = DiskRef("vda", 10 * CHUNK, CHUNK, [ChunkId(os.urandom(32))], path="/dev/vg/vda")
    snap = Snapshot(
        time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        host="h",
        paths=["vm1"],
        tree=None,
        kind="vm",
        disks=[ref],
        vm_config={"name": "vm1", "memory_mib": 512},
    )
    doc = snap.to_document()
    again = Snapshot.from_document("ab" * 32, doc)
    assert again.tree is None and again.kind == "vm"
    assert again.disks == [ref] and again.vm_config == {"name": "vm1", "memory_mib": 512}
    files = dict(doc, kind="files", tree="cd" * 32)
    del files["disks"], files["vm_config"]  # a document written before disks existed
    old = Snapshot.from_document("ef" * 32, files)
    assert old.disks == [] and old.vm_config is None and old.tree == bytes.fromhex("cd" * 32)
