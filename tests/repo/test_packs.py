"""Packs are filled in files, not in memory: the same bytes, sizes and names as before."""

from __future__ import annotations

import errno
import os
import tracemalloc
from pathlib import Path

import pytest

from stratavault.errors import StorageError, StorageFullError
from stratavault.repo._crypto import MasterKeys, content_hash
from stratavault.repo._open_packs import OpenPacks
from stratavault.repo._packs import OpenPack, PackFile, pack_name, parse_pack_tail, seal_pack
from stratavault.storage import TEMP_PREFIX, LocalStorage


def _fill(pack: OpenPack, blobs: list[bytes]) -> None:
    for i, blob in enumerate(blobs):
        pack.append(i.to_bytes(32, "big"), 1, blob, len(blob))


def _bytes(pack: OpenPack) -> bytes:
    with open(pack.file.path, "rb") as fh:
        return fh.read()


def test_a_sealed_pack_is_its_blobs_then_its_header_and_named_by_its_hash(
    tmp_path: Path,
) -> None:
    keys = MasterKeys.generate()
    blobs = [os.urandom(n) for n in (1000, 5000, 300)]
    pack = OpenPack(1, PackFile(str(tmp_path)))
    _fill(pack, blobs)
    assert pack.blob((1).to_bytes(32, "big")) == blobs[1]
    sealed = seal_pack(keys, pack)
    data = _bytes(pack)
    assert data[:6300] == b"".join(blobs)
    assert sealed.name == pack_name(content_hash(data))
    entries = parse_pack_tail(keys, sealed.name, data, len(data))
    assert not isinstance(entries, int) and entries.tobytes() == sealed.entries.tobytes()
    assert pack.blob((2).to_bytes(32, "big")) == blobs[2]  # the header is not part of it
    assert pack.blob(b"x" * 32) is None
    pack.file.remove()


def test_pack_files_leave_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    anonymous = PackFile(str(tmp_path))  # O_TMPFILE: no name at all
    anonymous.write(b"abc")
    assert list(tmp_path.iterdir()) == []
    anonymous.remove()
    monkeypatch.delattr(os, "O_TMPFILE")  # a file system or platform without it
    named = PackFile(str(tmp_path))
    named.write(b"abc")
    (entry,) = tmp_path.iterdir()
    assert entry.name.startswith(TEMP_PREFIX) and named.path == str(entry)
    assert entry.read_bytes() == b"abc"
    named.remove()
    assert list(tmp_path.iterdir()) == []


def test_pack_file_errors_name_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StorageError, match=str(tmp_path / "missing")):
        PackFile(str(tmp_path / "missing"))
    pack = PackFile(str(tmp_path))

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    pack.write(b"abc")  # small writes are gathered
    with pytest.raises(StorageFullError, match=f"writing a pack file in {tmp_path}"):
        pack.write(os.urandom(2 << 20))
    with pytest.raises(StorageFullError):  # broken for good: the pack is given up
        pack.write(b"more")
    pack.remove()


def test_a_short_write_then_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pack = PackFile(str(tmp_path))
    pwrite = os.pwrite
    calls = []

    def short_then_full(fd: int, data: memoryview, offset: int) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return pwrite(fd, data[:1000], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", short_then_full)
    with pytest.raises(StorageFullError):
        pack.write(os.urandom(2 << 20))
    assert calls == [2 << 20, (2 << 20) - 1000]  # the rest was tried at once
    with pytest.raises(StorageFullError):
        pack.write(os.urandom(2 << 20))  # no BufferError: nothing was left exported
    monkeypatch.undo()
    pack.remove()


def test_gathered_writes_are_read_back_and_hashed(tmp_path: Path) -> None:
    pack = PackFile(str(tmp_path))
    pieces = [os.urandom(n) for n in (10, 3000, 1 << 20, 5, (1 << 20) - 7, 999)]
    for piece in pieces:
        pack.write(piece)
    data = b"".join(pieces)
    assert pack.length == len(data)
    assert pack.read(3010, 1 << 20) == data[3010 : 3010 + (1 << 20)]
    pack.write(b"tail")
    assert pack.content_hash() == content_hash(data + b"tail")
    with open(pack.path, "rb") as fh:
        assert fh.read() == data + b"tail"
    pack.remove()


def test_filling_a_pack_holds_no_copy_of_it_in_memory(tmp_path: Path) -> None:
    packs = OpenPacks(str(tmp_path), 8 << 20)
    blob = os.urandom(1 << 20)
    tracemalloc.start()
    try:
        for i in range(6):
            assert packs.append(0, [(i.to_bytes(32, "big"), len(blob))], blob) == []
        assert tracemalloc.get_traced_memory()[1] < 256 << 10
    finally:
        tracemalloc.stop()
    (pack,) = packs.take_all()
    assert pack.size == 6 << 20
    pack.file.remove()


def test_sealed_bytes_is_the_size_of_the_sealed_pack(tmp_path: Path) -> None:
    keys = MasterKeys.generate()
    pack = OpenPack(1, PackFile(str(tmp_path)))
    empty = OpenPack(2, PackFile(str(tmp_path)))
    assert pack.sealed_bytes(700, 1) == empty.sealed_bytes() + 700 + 45
    _fill(pack, [os.urandom(n) for n in (1000, 5000, 300)])
    expected = pack.sealed_bytes(4000, 2)
    pack.append_frame([(b"a" * 32, 1000), (b"b" * 32, 3000)], 0x81, os.urandom(4000))
    seal_pack(keys, pack)
    assert pack.sealed_bytes() > expected == pack.size == len(_bytes(pack))
    for p in (pack, empty):
        p.file.remove()


def test_packs_are_closed_before_a_blob_would_take_them_past_the_target(tmp_path: Path) -> None:
    target = 10_000
    packs = OpenPacks(str(tmp_path), target)
    full: list[OpenPack] = []
    for i in range(40):
        full += packs.append(0, [(i.to_bytes(32, "big"), 1000)], os.urandom(1000))
    full += packs.take_all()
    keys = MasterKeys.generate()
    for p in full:
        seal_pack(keys, p)
    sizes = [p.size for p in full]
    assert sum(p.count for p in full) == 40
    assert all(s <= target for s in sizes)
    assert all(s + 1045 > target for s in sizes[:-1])  # the next blob did not fit


def test_a_blob_larger_than_the_target_gets_a_pack_of_its_own(tmp_path: Path) -> None:
    packs = OpenPacks(str(tmp_path), 1000)
    assert packs.append(0, [(b"a" * 32, 100)], os.urandom(100)) == []
    first, alone = packs.append(0, [(b"b" * 32, 5000)], os.urandom(5000))
    assert (first.count, alone.count) == (1, 1)
    assert packs.take_all() == []


def test_trees_and_data_fill_packs_of_their_own(tmp_path: Path) -> None:
    packs = OpenPacks(str(tmp_path), 10_000)
    packs.append(1, [(b"t" * 32, 100)], os.urandom(100))
    packs.append(0, [(b"d" * 32, 200)], os.urandom(200))
    tree, data = packs.take_all()
    assert (tree.size, data.size) == (100, 200)


def test_a_local_repository_stores_a_pack_file_without_copying_it(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    pack = PackFile(store.properties.staging_dir or "")
    pack.write(os.urandom(3 << 20))
    store.put_file("data/ab/abcd", pack.path)
    assert os.stat(pack.path).st_ino == os.stat(tmp_path / "data/ab/abcd").st_ino
    pack.remove()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # nothing else left
