"""ReadOnlyStorage and AppendOnlyStorage refusals."""

from __future__ import annotations

import pytest

from stratavault.errors import ObjectExistsError, PermissionDeniedError
from stratavault.storage import AppendOnlyStorage, MemoryStorage, ReadOnlyStorage


@pytest.fixture
def inner() -> MemoryStorage:
    store = MemoryStorage()
    store.put("snapshots/1", b"snap")
    store.put("locks/1", b"lock")
    return store


def test_read_only_reads(inner: MemoryStorage) -> None:
    ro = ReadOnlyStorage(inner)
    assert ro.get("snapshots/1", 1, 2) == b"na"
    assert ro.stat("locks/1").size_bytes == 4
    assert sorted(i.name for i in ro.list()) == ["locks/1", "snapshots/1"]
    assert ro.properties == inner.properties


def test_read_only_refuses_changes(inner: MemoryStorage) -> None:
    ro = ReadOnlyStorage(inner)
    with pytest.raises(PermissionDeniedError, match="put new at memory: - read-only"):
        ro.put("new", b"x")
    with pytest.raises(PermissionDeniedError):
        ro.put("snapshots/1", b"x", overwrite=True)
    for name in ("snapshots/1", "locks/1"):
        with pytest.raises(PermissionError):  # PermissionDeniedError is also one
            ro.delete(name)
    assert sorted(i.name for i in inner.list()) == ["locks/1", "snapshots/1"]
    assert inner.get("snapshots/1") == b"snap"


def test_append_only_adds(inner: MemoryStorage) -> None:
    ao = AppendOnlyStorage(inner)
    ao.put("snapshots/2", b"two")
    ao.put("snapshots/3", b"three", overwrite=True)  # creating with overwrite=True is fine
    ao.put("snapshots/3", b"three", overwrite=True)  # identical bytes: an idempotent retry
    assert inner.get("snapshots/2") == b"two" and inner.get("snapshots/3") == b"three"
    with pytest.raises(ObjectExistsError):
        ao.put("snapshots/2", b"two")  # overwrite=False keeps its usual error


def test_append_only_refuses_delete_and_overwrite(inner: MemoryStorage) -> None:
    ao = AppendOnlyStorage(inner)
    with pytest.raises(PermissionDeniedError, match="append-only"):
        ao.delete("snapshots/1")
    with pytest.raises(PermissionDeniedError, match="append-only"):
        ao.put("snapshots/1", b"evil", overwrite=True)
    with pytest.raises(PermissionDeniedError):
        ao.delete("missing")
    assert inner.get("snapshots/1") == b"snap"


def test_append_only_allows_locks(inner: MemoryStorage) -> None:
    ao = AppendOnlyStorage(inner)
    ao.put("locks/1", b"refreshed", overwrite=True)
    assert inner.get("locks/1") == b"refreshed"
    ao.delete("locks/1")
    assert [i.name for i in inner.list()] == ["snapshots/1"]
    with pytest.raises(PermissionDeniedError):
        ao.delete("locksmith/1")  # the exception is the folder locks/, not a name prefix
