import os
import random

import pytest

from stratavault.chunking import CdcChunker, FixedChunker


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("piece", [1, 4096, 3 * 1024 * 1024 + 17, 64 * 1024 * 1024])
def test_cdc_boundaries_do_not_depend_on_buffering(piece: int) -> None:
    data = random.Random(1).randbytes(12 << 20)
    chunker = CdcChunker(avg_bytes=256 << 10)
    whole = [bytes(c) for c in chunker.split([data])]
    split = [bytes(c) for c in chunker.split(_pieces(data, piece) if piece > 1 else [data])]
    assert whole == split
    assert b"".join(split) == data
    assert all(len(c) <= chunker.max_bytes for c in split)


def test_cdc_insertion_shifts_only_nearby_chunks() -> None:
    data = random.Random(2).randbytes(16 << 20)
    chunker = CdcChunker(avg_bytes=256 << 10)
    before = {bytes(c) for c in chunker.split([data])}
    after = [bytes(c) for c in chunker.split([data[:1000] + b"inserted" + data[1000:]])]
    assert sum(c not in before for c in after) <= 3


def test_cdc_empty_stream() -> None:
    assert list(CdcChunker().split([])) == []
    assert list(CdcChunker().split([b""])) == []


def test_fixed_chunker_regroups_buffers() -> None:
    data = os.urandom(10_000)
    chunks = [bytes(c) for c in FixedChunker(4096).split(_pieces(data, 1000))]
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(chunks) == data
