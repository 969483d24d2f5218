"""Frames: neighbouring chunks compressed together in one blob, each keeping its own id."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from stratavault.errors import IntegrityError
from stratavault.repo import Repository, _formats as F
from stratavault.repo._frames import Frame, seal_frame
from stratavault.repo._index import Entry
from stratavault.repo._reading import open_blob
from stratavault.storage import MemoryStorage
from stratavault.types import BlobKind, ChunkId

from .conftest import open_repo

CHUNK = 64 << 10


def similar_chunks(n: int, seed: int = 3) -> list[bytes]:
    """Chunks of text-like data drawn from one vocabulary: they compress better together."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(range(97, 123), k=rng.randrange(3, 12))) for _ in range(3000)]
    out = []
    for _ in range(n):
        text = b" ".join(rng.choices(words, k=CHUNK // 4))
        out.append(text[:CHUNK])
    return out


def framed(repo: Repository, chunks: list[bytes]) -> tuple[list[ChunkId], tuple[int, int]]:
    ids = [repo.chunk_id(c) for c in chunks]
    return ids, repo.add_chunks(list(zip(ids, map(memoryview, chunks), strict=True)))


def test_frame_round_trip_before_and_after_flush_and_reopen(
    repo: Repository, storage: MemoryStorage
) -> None:
    chunks = similar_chunks(4)
    ids, (added, stored) = framed(repo, chunks)
    assert added == 4 and 0 < stored < sum(map(len, chunks)) // 2
    assert [repo.read_chunk(i) for i in ids] == chunks  # from the pack in memory
    repo.flush()
    infos = [repo.chunk_info(i) for i in ids]
    assert len({(i.pack, i.offset, i.stored_bytes) for i in infos}) == 1  # one blob
    assert [i.raw_bytes for i in infos] == [CHUNK] * 4 and infos[0].kind == BlobKind.DATA
    repo.close()
    with open_repo(storage, None) as again:
        assert [again.read_chunk(i) for i in reversed(ids)] == chunks[::-1]
        assert dict(again.read_chunks(ids)) == dict(zip(ids, chunks, strict=True))


def test_a_frame_is_smaller_than_its_chunks_one_by_one(repo: Repository) -> None:
    chunks = similar_chunks(8)
    _, (_, together) = framed(repo, chunks[:4])
    alone = sum(repo.add_chunk(repo.chunk_id(c), c) for c in chunks[4:])
    assert together < alone * 0.97


def test_only_new_chunks_go_into_a_frame(repo: Repository) -> None:
    chunks = similar_chunks(4)
    ids = [repo.chunk_id(c) for c in chunks]
    repo.add_chunk(ids[1], chunks[1])
    _, (added, _) = framed(repo, [chunks[0], chunks[1], chunks[2], chunks[0]])
    assert added == 2  # chunks 0 and 2; 1 is stored, and 0 twice counts once
    assert framed(repo, chunks[:3]) == (ids[:3], (0, 0))
    _, (added, stored) = framed(repo, chunks)
    assert added == 1 and stored > 0  # chunk 3 alone: a plain blob
    repo.flush()
    three, zero = repo.chunk_info(ids[3]), repo.chunk_info(ids[0])
    assert (three.pack, three.offset) != (zero.pack, zero.offset)
    assert [repo.read_chunk(i) for i in ids] == chunks


def test_a_frame_read_for_a_chunk_it_does_not_hold_fails(repo: Repository) -> None:
    chunks = similar_chunks(3)
    ids = [repo.chunk_id(c) for c in chunks]
    blob = seal_frame(repo._keys, int(BlobKind.DATA), [(ids[0], chunks[0]), (ids[1], chunks[1])], 3)
    entry = Entry(0, BlobKind.DATA | F.KIND_FRAMED, 0, len(blob), CHUNK)
    assert open_blob(repo._keys, "p", ids[1], entry, blob) == chunks[1]
    with pytest.raises(IntegrityError, match="does not hold this chunk"):
        open_blob(repo._keys, "p", ids[2], entry, blob)
    damaged = bytearray(blob)
    damaged[40] ^= 1
    with pytest.raises(IntegrityError, match="frame in pack p at offset 0 - authentication"):
        open_blob(repo._keys, "p", ids[1], entry, bytes(damaged))
    short = Entry(0, BlobKind.DATA | F.KIND_FRAMED, 0, len(blob), CHUNK - 1)
    with pytest.raises(IntegrityError, match="the index says"):
        open_blob(repo._keys, "p", ids[1], short, blob)
    tree = Entry(0, BlobKind.TREE | F.KIND_FRAMED, 0, len(blob), CHUNK)  # kind is bound
    with pytest.raises(IntegrityError, match="authentication"):
        open_blob(repo._keys, "p", ids[1], tree, blob)


def test_a_corrupt_frame_in_storage_names_pack_and_offset(
    repo: Repository, storage: MemoryStorage, tmp_path: Path
) -> None:
    ids, _ = framed(repo, similar_chunks(4))
    repo.close()
    (pack,) = (o.name for o in storage.list("data/"))
    data = bytearray(storage.get(pack))
    data[100] ^= 0xFF
    storage.put(pack, bytes(data), overwrite=True)
    with open_repo(storage, None) as again:
        for cid in ids:
            with pytest.raises(IntegrityError, match=f"frame in pack {pack} at offset 0"):
                again.read_chunk(cid)


def test_frame_decoding_rejects_malformed_tables() -> None:
    with pytest.raises(ValueError, match="member count"):
        Frame.decode(b"\x02", 1 << 20)
    with pytest.raises(ValueError, match="does not fit"):
        Frame.decode(F.FRAME_COUNT.pack(1) + F.FRAME_MEMBER.pack(b"x" * 32, 4) + b"\0abcd", 99)
    two = F.FRAME_COUNT.pack(2) + F.FRAME_MEMBER.pack(b"a" * 32, 4) * 2
    with pytest.raises(ValueError, match="more than"):
        Frame.decode(two + b"\0abcdabcd", 7)
    with pytest.raises(ValueError, match="add up to 8"):
        Frame.decode(two + b"\0abcdabc", 1 << 20)
    assert Frame.decode(two + b"\0abcdabcd", 8).member(b"a" * 32) == b"abcd"


def test_members_read_one_by_one_decode_their_frame_once(
    repo: Repository, storage: MemoryStorage
) -> None:
    """Instant recovery and file-level restore read chunk by chunk: a frame is fetched and
    decoded once for all its members, not once per member."""
    from .test_chunks import _CountingGets

    ids, _ = framed(repo, similar_chunks(4))
    repo.close()
    counting = _CountingGets(storage)
    with open_repo(counting, None) as again:
        before = counting.gets
        for cid in ids * 2:
            again.read_chunk(cid)
        assert counting.gets == before + 1


def test_more_chunks_than_a_frame_holds_go_into_several_frames(repo: Repository) -> None:
    chunks = [bytes([i]) * 1000 + bytes(range(i)) for i in range(F.FRAME_MAX_MEMBERS + 6)]
    ids, (added, _) = framed(repo, chunks)
    assert added == len(chunks)
    repo.flush()
    assert len({repo.chunk_info(i).offset for i in ids}) == 2
    assert [repo.read_chunk(i) for i in ids] == chunks
