"""open_storage: location strings to backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratavault.errors import UsageError
from stratavault.storage import LocalStorage, MemoryStorage, open_storage


def test_memory() -> None:
    first, second = open_storage("memory:"), open_storage("memory:")
    assert isinstance(first, MemoryStorage)
    first.put("x", b"1")
    assert list(second.list()) == []  # every call is a new, empty store


@pytest.mark.parametrize("form", ["{p}", "file://{p}", "file://localhost{p}"])
def test_local_forms(tmp_path: Path, form: str) -> None:
    store = open_storage(form.format(p=tmp_path / "repo"))
    assert isinstance(store, LocalStorage)
    assert store.root == tmp_path / "repo"
    store.put("config", b"c")
    assert (tmp_path / "repo/config").read_bytes() == b"c"


def test_relative_path_and_colon_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_storage("./a:b")
    assert isinstance(store, LocalStorage) and store.root == tmp_path / "a:b"
    assert isinstance(store := open_storage("repo"), LocalStorage)
    assert store.properties.location == str(tmp_path / "repo")


def test_file_url_is_unquoted(tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path}/my%20repo")
    assert isinstance(store, LocalStorage) and store.root == tmp_path / "my repo"


@pytest.mark.parametrize(
    "location",
    [
        "",
        "s3:ftp://host/bucket",
        "s3://ab",
        "sftp:host:/x",
        "file://otherhost/x",
        "file:relative",
        "memory:x",
    ],
)
def test_unsupported(location: str) -> None:
    with pytest.raises(UsageError):
        open_storage(location)
