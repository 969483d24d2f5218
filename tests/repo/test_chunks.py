from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import pytest

from stratavault.errors import (
    ChunkNotFoundError,
    DataDamagedError,
    IntegrityError,
    SnapshotNotFoundError,
    StorageFullError,
    UsageError,
)
from stratavault.repo import KdfParams, Repository
from stratavault.storage import FaultyStorage, MemoryStorage, StorageProperties, StorageWrapper
from stratavault.types import BlobKind, ChunkId

from .conftest import PASS, SMALL_PACK, open_repo, random_chunks


def add_all(repo: Repository, chunks: list[bytes]) -> list[ChunkId]:
    ids = [repo.chunk_id(c) for c in chunks]
    for cid, data in zip(ids, chunks, strict=True):
        repo.add_chunk(cid, data)
    return ids


def test_round_trip_across_packs_and_reopen(repo: Repository, storage: MemoryStorage) -> None:
    chunks = [*random_chunks(30), b"", b"a" * 100_000]
    ids = add_all(repo, chunks)
    assert all(repo.read_chunk(i) == c for i, c in zip(ids, chunks, strict=True))  # before flush
    repo.close()
    assert len(list(storage.list("data/"))) > 3
    with open_repo(storage, None) as again:
        assert [again.read_chunk(i) for i in ids] == chunks
        got = dict(again.read_chunks([*ids, *reversed(ids)]))
        assert len(got) == len(ids) and all(got[i] == c for i, c in zip(ids, chunks, strict=True))


def test_chunk_id_is_keyed(repo: Repository, storage: MemoryStorage) -> None:
    other = Repository.init(MemoryStorage(), PASS, cache_dir=None, kdf=KdfParams.fast())
    assert repo.chunk_id(b"x") != other.chunk_id(b"x")
    assert repo.chunk_id(b"x") == repo.chunk_id(memoryview(b"x"))
    assert len(repo.chunk_id(b"x")) == 32


def test_missing_chunk(repo: Repository) -> None:
    with pytest.raises(ChunkNotFoundError):
        repo.read_chunk(ChunkId(b"\1" * 32))


def test_dedup_same_chunk_twice(repo: Repository) -> None:
    data = os.urandom(5000)
    cid = repo.chunk_id(data)
    assert repo.add_chunk(cid, data) > 5000
    assert repo.add_chunk(cid, data) == 0
    repo.flush()
    assert repo.add_chunk(cid, data) == 0
    assert repo.stats().chunks == 1


def test_dedup_from_eight_threads(repo: Repository) -> None:
    chunks = random_chunks(40, 3000)
    ids = [repo.chunk_id(c) for c in chunks]
    added: list[int] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for cid, data in zip(ids, chunks, strict=True):
            added.append(repo.add_chunk(cid, data))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for a in added if a) == 40
    repo.flush()
    stats = repo.stats()
    assert stats.chunks == 40 and stats.raw_bytes == 40 * 3000


def test_incompressible_stored_raw_compressible_shrinks(repo: Repository) -> None:
    noise = os.urandom(100_000)
    text = b"abcdefgh" * 12_500
    assert repo.add_chunk(repo.chunk_id(noise), noise) == 100_000 + 1 + 28
    assert repo.add_chunk(repo.chunk_id(text), text, level=1) < 1000
    assert repo.read_chunk(repo.chunk_id(text)) == text


def test_chunk_info(repo: Repository) -> None:
    cid = repo.chunk_id(b"tree")
    repo.add_chunk(cid, b"tree", BlobKind.TREE)
    repo.flush()
    info = repo.chunk_info(cid)
    assert info.kind is BlobKind.TREE and info.raw_bytes == 4 and info.pack.startswith("data/")
    assert info.pack.split("/")[1] == info.pack.split("/")[2][:2]


def _only_pack(storage: MemoryStorage) -> str:
    (pack,) = [o.name for o in storage.list("data/")]
    return pack


def test_corrupted_byte_names_pack_and_chunk(repo: Repository, storage: MemoryStorage) -> None:
    ids = add_all(repo, random_chunks(3, 1000))
    repo.flush()
    info = repo.chunk_info(ids[1])
    raw = bytearray(storage.get(info.pack))
    raw[info.offset + 20] ^= 1
    storage.put(info.pack, bytes(raw), overwrite=True)
    with pytest.raises(IntegrityError) as err:
        repo.read_chunk(ids[1])
    assert info.pack in str(err.value) and ids[1].hex() in str(err.value)
    assert repo.read_chunk(ids[0])
    with pytest.raises(IntegrityError):
        dict(repo.read_chunks(ids))


def test_truncated_pack(repo: Repository, storage: MemoryStorage) -> None:
    ids = add_all(repo, random_chunks(3, 1000))
    repo.flush()
    pack = _only_pack(storage)
    storage.put(pack, storage.get(pack)[:1500], overwrite=True)
    with pytest.raises(IntegrityError, match="truncated"):
        repo.read_chunk(ids[1])
    with pytest.raises(IntegrityError, match=pack):
        list(repo.read_chunks(ids))


def test_bit_flips_on_read_are_damage_not_a_wrong_passphrase(
    repo: Repository, storage: MemoryStorage
) -> None:
    repo.close()
    faulty = FaultyStorage(storage, seed=1, corrupt_gets=True)
    with pytest.raises(DataDamagedError) as err:  # config or key file, never PassphraseError
        open_repo(faulty, None)
    assert err.value.exit_code == 12


def test_swapped_blobs_detected_through_ad(repo: Repository, storage: MemoryStorage) -> None:
    a, b = random_chunks(2, 1000)
    ida, idb = add_all(repo, [a, b])
    repo.flush()
    pack = _only_pack(storage)
    ia, ib = repo.chunk_info(ida), repo.chunk_info(idb)
    raw = bytearray(storage.get(pack))
    blob_a = raw[ia.offset : ia.offset + ia.stored_bytes]
    raw[ia.offset : ia.offset + ia.stored_bytes] = raw[ib.offset : ib.offset + ib.stored_bytes]
    raw[ib.offset : ib.offset + ib.stored_bytes] = blob_a
    storage.put(pack, bytes(raw), overwrite=True)
    for cid in (ida, idb):
        with pytest.raises(IntegrityError, match="authentication"):
            repo.read_chunk(cid)


def test_failed_upload_surfaces_and_is_never_indexed(storage: MemoryStorage) -> None:
    Repository.init(storage, PASS, cache_dir=None, kdf=KdfParams.fast()).close()
    faulty = FaultyStorage(storage, seed=1, fail_puts_after=SMALL_PACK // 2)
    repo = open_repo(faulty, None)
    chunks = random_chunks(20, 10_000)
    with pytest.raises(StorageFullError):
        add_all(repo, chunks)
        repo.flush()
    with pytest.raises(StorageFullError):
        repo.flush()
    repo.close()
    assert list(storage.list("index/")) == []
    with open_repo(storage, None) as again:
        assert not again.has_chunk(again.chunk_id(chunks[0]))


def test_snapshots(repo: Repository, storage: MemoryStorage) -> None:
    cid = repo.chunk_id(b"x")
    repo.add_chunk(cid, b"x")
    first = repo.save_snapshot({"n": 1, "tree": cid.hex()})
    assert list(storage.list("index/")), "index must be written before the snapshot"
    second = repo.save_snapshot({"n": 2})
    assert repo.load_snapshot(first) == {"n": 1, "tree": cid.hex()}
    assert dict(repo.list_snapshots()) == {first: repo.load_snapshot(first), second: {"n": 2}}
    assert repo.resolve_snapshot_id(first[:10]) == first
    same = next(i for i, (x, y) in enumerate(zip(first, second, strict=True)) if x != y)
    common = first[:same]
    with pytest.raises(UsageError, match="ambiguous"):
        repo.resolve_snapshot_id(common)
    with pytest.raises(SnapshotNotFoundError):
        repo.resolve_snapshot_id("0" * 64)
    repo.remove_snapshot(first)
    with pytest.raises(SnapshotNotFoundError):
        repo.load_snapshot(first)
    assert repo.stats().snapshots == 1


def test_tampered_snapshot(repo: Repository, storage: MemoryStorage) -> None:
    sid = repo.save_snapshot({"n": 1})
    raw = bytearray(storage.get(f"snapshots/{sid}"))
    raw[-1] ^= 1
    storage.put(f"snapshots/{sid}", bytes(raw), overwrite=True)
    with pytest.raises(IntegrityError):
        repo.load_snapshot(sid)


def test_local_storage_round_trip(tmp_path: Path) -> None:
    from stratavault.storage import LocalStorage

    storage = LocalStorage(tmp_path / "repo")
    chunks = random_chunks(10, 20_000)
    with Repository.init(
        storage, PASS, cache_dir=tmp_path / "c", kdf=KdfParams.fast(), pack_target_bytes=SMALL_PACK
    ) as repo:
        ids = add_all(repo, chunks)
    with Repository.open(storage, PASS, cache_dir=tmp_path / "c") as again:
        assert [again.read_chunk(i) for i in ids] == chunks


class _CountingGets(StorageWrapper):
    def __init__(self, inner: MemoryStorage) -> None:
        super().__init__(inner)
        self.gets = 0

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.gets += 1
        return super().get(name, offset, length)


def test_trees_are_read_in_windows(repo: Repository, storage: MemoryStorage, cache: Path) -> None:
    """Reading a snapshot's trees costs about one read per pack, not one per folder (what an
    incremental backup from a remote repository pays in requests)."""
    ids = []
    for data in random_chunks(300, 2_000):
        cid = repo.chunk_id(data)
        repo.add_chunk(cid, data, BlobKind.TREE)
        ids.append((cid, data))
    repo.close()
    counting = _CountingGets(storage)
    with Repository.open(counting, PASS, cache_dir=cache) as again:
        before = counting.gets
        for cid, data in reversed(ids):  # root first: the order a walk asks for them
            assert again.read_chunk(cid) == data
        packs = len(list(storage.list("data/")))
        assert counting.gets - before <= packs + 1 < len(ids) // 10


def test_chunks_by_pack_groups_as_chunk_info(repo: Repository) -> None:
    flushed = add_all(repo, random_chunks(20))
    repo.flush()
    in_memory = add_all(repo, random_chunks(3))  # the open pack is not uploaded yet
    ids = [*flushed, *in_memory, flushed[0]]
    by_pack = repo.chunks_by_pack(ids)
    assert sorted(c for group in by_pack.values() for c in group) == sorted(set(ids))
    for pack, group in by_pack.items():
        assert all(repo.chunk_info(c).pack == pack for c in group)
    assert any(pack.startswith("(pack in memory") for pack in by_pack)
    lost = ChunkId(b"\1" * 32)
    with pytest.raises(ChunkNotFoundError, match=lost.hex()):
        repo.chunks_by_pack([flushed[0], lost])
    missing: list[ChunkId] = []
    assert repo.chunks_by_pack([lost, flushed[1]], missing=missing) == {
        repo.chunk_info(flushed[1]).pack: [flushed[1]]
    }
    assert missing == [lost]


class _RecordingGets(StorageWrapper):
    """Records the length of every ranged get, and reports ``read_range_bytes``."""

    def __init__(self, inner: MemoryStorage, read_range_bytes: int) -> None:
        super().__init__(inner)
        self.lengths: list[int] = []
        self._props = dataclasses.replace(inner.properties, read_range_bytes=read_range_bytes)

    @property
    def properties(self) -> StorageProperties:
        return self._props

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.lengths.append(-1 if length is None else length)
        return super().get(name, offset, length)


@pytest.mark.parametrize("range_kib", [64, 300, 1024])
def test_restores_read_packs_in_ranges_of_at_most_the_backends_size(
    storage: MemoryStorage, cache: Path, range_kib: int
) -> None:
    """Neighbouring blobs are read together up to the backend's ``read_range_bytes`` (a
    restore's buffers stay that small); a larger blob is read alone, whole."""
    chunks = [*random_chunks(60, 20_000), os.urandom(200_000)]
    with Repository.init(
        storage, PASS, cache_dir=cache, kdf=KdfParams.fast(), pack_target_bytes=4 << 20
    ) as repo:
        ids = add_all(repo, chunks)
    recording = _RecordingGets(storage, range_kib << 10)
    with Repository.open(recording, PASS, cache_dir=cache) as again:
        got = dict(again.read_chunks(ids))
    assert [got[c] for c in ids] == chunks
    lengths = [n for n in recording.lengths if n > 0]
    biggest = max(len(c) for c in chunks) + 1024  # one incompressible blob, sealed
    assert max(lengths) <= max(range_kib << 10, biggest)
    assert len(lengths) < len(chunks)  # neighbours merged
