"""Reading tree blobs through the window cache: each part of a pack read once, in pieces."""

from __future__ import annotations

import os
import random

from stratavault.repo._reading import WindowCache
from stratavault.storage import MemoryStorage

MIB = 1 << 20


class CountingStorage(MemoryStorage):
    """Counts the bytes that ``get`` returns."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[int, int]] = []

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = super().get(name, offset, length)
        self.reads.append((offset, len(data)))
        return data


def test_blobs_come_from_aligned_pieces_read_once() -> None:
    storage = CountingStorage()
    pack = os.urandom(5 * MIB + 12345)
    storage.put("data/p", pack)
    blobs = []  # a walk's order: the end first, then forward through the pack, twice
    offset = 0
    while offset < len(pack) - 5000:
        length = random.Random(offset).randrange(100, 5000)
        blobs.append((offset, length))
        offset += length
    cache = WindowCache(window=MIB, windows=8)
    for offset, length in [blobs[-1], *blobs, *blobs]:
        assert cache.get(storage, "data/p", offset, length) == pack[offset : offset + length]
    pieces = [(o, n) for o, n in storage.reads if o % MIB == 0]
    assert len(pieces) == 6  # each piece once; blobs across a piece's end read alone
    assert sum(n for _, n in storage.reads) <= len(pack) + 2 * 5 * 5000


def test_least_recently_used_piece_goes_first() -> None:
    storage = CountingStorage()
    pack = os.urandom(4 * MIB)
    storage.put("data/p", pack)
    cache = WindowCache(window=MIB, windows=2)
    for offset in (0, MIB, 10, 2 * MIB, 20):  # 0 was used again: MIB goes, 0 stays
        cache.get(storage, "data/p", offset, 100)
    cache.get(storage, "data/p", MIB + 5, 100)
    assert [o for o, _ in storage.reads] == [0, MIB, 2 * MIB, MIB]


def test_a_truncated_pack_gives_short_data_not_an_error() -> None:
    storage = CountingStorage()
    storage.put("data/p", b"x" * 1000)
    assert WindowCache().get(storage, "data/p", 900, 500) == b"x" * 100
