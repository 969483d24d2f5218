"""Packs filled in buffers used before: the same bytes as in a fresh buffer."""

from __future__ import annotations

import os

from stratavault.repo._crypto import MasterKeys
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
