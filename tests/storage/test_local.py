"""LocalStorage specifics: temp files, folder/object clashes, a full filesystem."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stratavault.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
    StorageFullError,
)
from stratavault.storage import LocalStorage
from tests.tmpfs import mounted_tmpfs


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_objects_are_plain_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "r")
    store.put("data/ab/abcd", b"xyz")
    assert (tmp_path / "r/data/ab/abcd").read_bytes() == b"xyz"
    assert store.properties.location == str(tmp_path / "r")
    assert store.properties.conditional_create and store.properties.durable


def test_no_temp_file_after_refused_put(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("data/a", b"1")
    with pytest.raises(ObjectExistsError):
        store.put("data/a", b"2")
    assert files_under(tmp_path) == ["data/a"]


def test_no_temp_file_after_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStorage(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match=r"put data/a at .* - Input/output error"):
        store.put("data/a", b"1")
    monkeypatch.undo()
    assert files_under(tmp_path) == []
    with pytest.raises(ObjectNotFoundError):
        store.get("data/a")


def test_list_skips_temp_files_and_foreign_entries(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("data/a", b"1")
    (tmp_path / "data/.tmp-1234").write_bytes(b"partial")
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "lost+found/x").write_bytes(b"?")
    assert [i.name for i in store.list()] == ["data/a"]


def test_list_of_missing_root_is_empty(tmp_path: Path) -> None:
    assert list(LocalStorage(tmp_path / "nowhere").list()) == []


def test_object_and_folder_of_the_same_name(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("a/b", b"1")
    with pytest.raises(ObjectNotFoundError):
        store.get("a")  # a folder is not an object
    with pytest.raises(ObjectNotFoundError):
        store.delete("a")
    with pytest.raises(StorageError) as info:
        store.put("a", b"2", overwrite=True)
    assert not isinstance(info.value, ObjectNotFoundError)
    store.put("c", b"3")
    with pytest.raises(StorageError, match="put c/d"):
        store.put("c/d", b"4")
    assert sorted(i.name for i in store.list()) == ["a/b", "c"]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: needs root (or CAP_SYS_ADMIN); skipped otherwise."""
    with mounted_tmpfs(tmp_path / "tiny", "1m") as mnt:
        yield mnt


@pytest.mark.infra("root, to mount a size-limited tmpfs")
def test_full_filesystem(tiny_fs: Path) -> None:
    store = LocalStorage(tiny_fs / "repo")
    blob = os.urandom(200 << 10)
    stored = []
    with pytest.raises(StorageFullError) as info:
        for i in range(10):
            store.put(f"data/{i:02d}", blob)
            stored.append(f"data/{i:02d}")
    failed = f"data/{len(stored):02d}"
    assert 2 <= len(stored) < 6
    assert failed in str(info.value) and str(tiny_fs / "repo") in str(info.value)
    assert info.value.exit_code == 14
    # nothing partial: no temp file, no short object, every stored object intact
    assert files_under(tiny_fs / "repo") == stored
    with pytest.raises(ObjectNotFoundError):
        store.stat(failed)
    assert all(store.get(name) == blob for name in stored)
    # space comes back after a delete, and an object too big fails cleanly at once
    store.delete(stored[-1])
    store.put(failed, blob)
    with pytest.raises(StorageFullError):
        store.put("data/huge", os.urandom(2 << 20), overwrite=True)
    assert files_under(tiny_fs / "repo") == [*stored[:-1], failed]


def test_put_file_links_a_staged_file_without_copying_it(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "r")
    assert store.properties.staging_dir == str(tmp_path / "r")
    (tmp_path / "r").mkdir()
    staged = tmp_path / "r" / ".tmp-pack-1"
    staged.write_bytes(b"pack bytes")
    store.put_file("data/ab/abcd", str(staged))
    assert os.stat(staged).st_ino == os.stat(tmp_path / "r/data/ab/abcd").st_ino
    staged.unlink()  # the caller's part
    assert store.get("data/ab/abcd") == b"pack bytes"
    assert files_under(tmp_path / "r") == ["data/ab/abcd"]


def test_put_file_copies_across_file_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStorage(tmp_path / "r")
    other = tmp_path / "other"
    other.write_bytes(b"from another disk")
    link = os.link

    def cross_device(src: str, dst: str, **kwargs: Any) -> None:
        if src == str(other):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", cross_device)
    store.put_file("data/ab/abcd", str(other))
    assert os.stat(other).st_ino != os.stat(tmp_path / "r/data/ab/abcd").st_ino
    assert store.get("data/ab/abcd") == b"from another disk"
    assert files_under(tmp_path / "r") == ["data/ab/abcd"]
