"""FaultyStorage injects the faults it documents, deterministically."""

from __future__ import annotations

import pytest

from stratavault.errors import ObjectNotFoundError, StorageFullError, TransientStorageError
from stratavault.storage import FaultyStorage, MemoryStorage


def outcomes(seed: int) -> list[str]:
    inner = MemoryStorage()
    store = FaultyStorage(inner, seed=seed, error_rate=0.5)
    result = []
    for i in range(40):
        try:
            store.put(f"o{i}", b"x")
            result.append("ok")
        except TransientStorageError:
            result.append("after" if f"o{i}" in {o.name for o in inner.list()} else "before")
    return result


def test_errors_are_deterministic_and_both_kinds_happen() -> None:
    first = outcomes(1)
    assert first == outcomes(1)
    assert first != outcomes(2)
    assert {"ok", "before", "after"} <= set(first)
    assert 10 <= first.count("ok") <= 30


def test_no_faults_by_default() -> None:
    store = FaultyStorage(MemoryStorage(), seed=1)
    for i in range(100):
        store.put(f"o{i}", b"abc")
        assert store.get(f"o{i}") == b"abc"
    assert store.faults == 0


def test_fail_puts_after_bytes() -> None:
    inner = MemoryStorage()
    store = FaultyStorage(inner, seed=1, fail_puts_after=10)
    store.put("a", b"12345")
    store.put("b", b"1234")
    with pytest.raises(StorageFullError, match="put c"):
        store.put("c", b"12")
    with pytest.raises(ObjectNotFoundError):
        inner.get("c")  # nothing stored
    store.put("d", b"1")  # still fits
    assert store.bytes_put == 10


def test_truncate_and_corrupt_gets() -> None:
    inner = MemoryStorage()
    inner.put("a", bytes(100))
    assert FaultyStorage(inner, seed=1, truncate_gets=True).get("a") == bytes(99)
    corrupt = FaultyStorage(inner, seed=1, corrupt_gets=True).get("a", 10, 50)
    assert len(corrupt) == 50 and sum(bin(b).count("1") for b in corrupt) == 1
    assert FaultyStorage(inner, seed=1, truncate_gets=True).get("a", 100) == b""
