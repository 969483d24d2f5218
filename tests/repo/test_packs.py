"""Packs filled in buffers used before: the same bytes as in a fresh buffer."""

from __future__ import annotations

import os
import tracemalloc

from stratavault.repo._crypto import MasterKeys
from stratavault.repo._open_packs import OpenPacks
from stratavault.repo._packs import OpenPack, PackBuffers, seal_pack


def _fill(pack: OpenPack, blobs: list[bytes]) -> None:
    for i, blob in enumerate(blobs):
        pack.append(i.to_bytes(32, "big"), 1, blob, len(blob))


def test_a_used_buffer_gives_the_same_pack_as_a_fresh_one() -> None:
    keys = MasterKeys.generate()
    blobs = [os.urandom(n) for n in (1000, 5000, 300)]
    fresh = OpenPack(1)
    _fill(fresh, blobs)
    used = OpenPack(1, bytearray(os.urandom(50_000)))  # longer, with old bytes in it
    _fill(used, blobs)
    assert used.blob((1).to_bytes(32, "big")) == blobs[1]
    a, b = seal_pack(keys, fresh), seal_pack(keys, used)
    assert len(a.data) == len(b.data) < 50_000
    assert bytes(a.data[:6300]) == bytes(b.data[:6300]) == b"".join(blobs)
    assert a.entries.tobytes() == b.entries.tobytes()
    assert used.blob((2).to_bytes(32, "big")) == blobs[2]  # the header is not part of it


def test_buffers_are_kept_only_when_no_view_of_them_is_alive() -> None:
    buffers = PackBuffers(keep=1)
    viewed = bytearray(1000)
    view = memoryview(viewed)
    buffers.give(viewed)
    assert buffers.take() is not viewed  # a view is alive: not reused
    view.release()
    buffers.give(viewed)
    buffers.give(bytearray(10))  # beyond ``keep``
    assert buffers.take() is viewed
    assert len(buffers.take()) == 0  # none left: a new one


def test_kept_buffers_do_not_grow() -> None:
    tracemalloc.start()
    try:
        buffers = PackBuffers()
        buffer = bytearray(1 << 20)
        before = tracemalloc.get_traced_memory()[0]
        buffers.give(buffer)
        assert buffers.take() is buffer
        assert tracemalloc.get_traced_memory()[0] < before + 4096  # not an eighth more
    finally:
        tracemalloc.stop()


def test_sealed_bytes_is_the_size_of_the_sealed_pack() -> None:
    keys = MasterKeys.generate()
    pack = OpenPack(1, bytearray(100_000))
    assert pack.sealed_bytes(700, 1) == OpenPack(2).sealed_bytes() + 700 + 45
    _fill(pack, [os.urandom(n) for n in (1000, 5000, 300)])
    expected = pack.sealed_bytes(4000, 2)
    pack.append_frame([(b"a" * 32, 1000), (b"b" * 32, 3000)], 0x81, os.urandom(4000))
    assert pack.sealed_bytes() == expected == len(seal_pack(keys, pack).data)


def test_packs_are_closed_before_a_blob_would_take_them_past_the_target() -> None:
    target = 10_000
    packs = OpenPacks(PackBuffers(), target)
    full: list[OpenPack] = []
    for i in range(40):
        full += packs.append(0, [(i.to_bytes(32, "big"), 1000)], os.urandom(1000))
    full += packs.take_all()
    keys = MasterKeys.generate()
    sizes = [len(seal_pack(keys, p).data) for p in full]
    assert sum(p.count for p in full) == 40
    assert all(s <= target for s in sizes)
    assert all(s + 1045 > target for s in sizes[:-1])  # the next blob did not fit


def test_a_blob_larger_than_the_target_gets_a_pack_of_its_own() -> None:
    packs = OpenPacks(PackBuffers(), 1000)
    assert packs.append(0, [(b"a" * 32, 100)], os.urandom(100)) == []
    first, alone = packs.append(0, [(b"b" * 32, 5000)], os.urandom(5000))
    assert (first.count, alone.count) == (1, 1)
    assert packs.take_all() == []


def test_tree_packs_do_not_take_the_data_buffers() -> None:
    buffers = PackBuffers()
    spare = bytearray(10_000)
    buffers.give(spare)
    packs = OpenPacks(buffers, 10_000)
    packs.append(1, [(b"t" * 32, 100)], os.urandom(100))
    (tree,) = packs.take_all()
    assert tree.data is not spare and len(tree.data) == 100
    assert buffers.take() is spare
