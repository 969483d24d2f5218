"""RetryingStorage: counts, backoff, ambiguous failures."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

import pytest

from stratavault.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from stratavault.storage import FaultyStorage, MemoryStorage, RetryingStorage, StorageWrapper

T = TypeVar("T")


class Script(StorageWrapper):
    """Fails the next calls as told: ``before`` (nothing done) or ``after`` (work done)."""

    def __init__(self, inner: MemoryStorage, plan: list[str]) -> None:
        super().__init__(inner)
        self.plan = plan
        self.calls = 0

    def _run(self, fn: Callable[[], T]) -> T:
        self.calls += 1
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "before":
            raise TransientStorageError("scripted failure before")
        if step == "connection":
            raise ConnectionResetError("scripted reset")
        result = fn()
        if step == "after":
            raise TransientStorageError("scripted failure after")
        return result

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self._run(lambda: self.inner.put(name, data, overwrite=overwrite))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._run(lambda: self.inner.get(name, offset, length))

    def delete(self, name: str) -> None:
        self._run(lambda: self.inner.delete(name))


def retrying(
    plan: list[str],
    sleeps: list[float],
    *,
    attempts: int = 5,
    backoff_s: float = 0.2,
    max_backoff_s: float = 5.0,
) -> tuple[RetryingStorage, Script]:
    script = Script(MemoryStorage(), plan)
    store = RetryingStorage(
        script,
        attempts=attempts,
        backoff_s=backoff_s,
        max_backoff_s=max_backoff_s,
        sleep=sleeps.append,
        rng=random.Random(1),
    )
    return store, script


def test_retries_until_success_with_growing_backoff() -> None:
    sleeps: list[float] = []
    store, script = retrying(["before"] * 4, sleeps, backoff_s=0.2, max_backoff_s=5)
    store.put("a", b"1")
    assert script.calls == 5 and store.get("a") == b"1"
    assert len(sleeps) == 4
    for n, slept in enumerate(sleeps):
        full = 0.2 * 2**n
        assert full / 2 <= slept <= full  # jitter only shortens, by half at most
    assert len(set(sleeps)) == 4


def test_backoff_is_capped() -> None:
    store, _ = retrying([], [], backoff_s=1, max_backoff_s=3)
    assert [store.delay_s(n) for n in (1, 2, 3, 4, 10)] == [1, 2, 3, 3, 3]


def test_gives_up_after_attempts() -> None:
    sleeps: list[float] = []
    store, script = retrying(["before"] * 10, sleeps, attempts=3)
    with pytest.raises(TransientStorageError):
        store.put("a", b"1")
    assert script.calls == 3 and len(sleeps) == 2


def test_permanent_errors_are_not_retried() -> None:
    sleeps: list[float] = []
    store, script = retrying([], sleeps)
    with pytest.raises(ObjectNotFoundError):
        store.get("missing")
    with pytest.raises(StorageError):
        store.put("bad//name", b"")
    assert script.calls == 2 and sleeps == []


def test_reads_retry_connection_errors_but_writes_do_not() -> None:
    store, script = retrying(["ok", "connection", "connection"], [])
    store.put("a", b"1")
    assert store.get("a") == b"1" and script.calls == 4  # 1 put, 3 gets
    store, script = retrying(["connection"], [])
    with pytest.raises(ConnectionResetError):
        store.put("a", b"1")
    assert script.calls == 1


def test_ambiguous_put_with_same_size_counts_as_done() -> None:
    store, script = retrying(["after"], [])
    store.put("data/x", b"payload")
    assert script.calls == 2 and store.get("data/x") == b"payload"


def test_put_of_an_existing_other_object_still_fails() -> None:
    store, _ = retrying([], [])
    store.put("data/x", b"one")
    with pytest.raises(ObjectExistsError):  # first attempt: never "ambiguous"
        store.put("data/x", b"one")
    store, _ = retrying(["ok", "before"], [])
    store.put("locks/l", b"other holder")
    with pytest.raises(ObjectExistsError):  # retried, but the size differs
        store.put("locks/l", b"mine")


def test_ambiguous_delete_counts_as_done() -> None:
    store, _ = retrying(["ok", "after"], [])
    store.put("locks/l", b"1")
    store.delete("locks/l")
    with pytest.raises(ObjectNotFoundError):
        store.delete("locks/l")


def test_list_restarts_without_duplicates() -> None:
    inner = MemoryStorage()
    for i in range(10):
        inner.put(f"index/{i}", b"i")
    faulty = FaultyStorage(inner, seed=3, error_rate=0.6)
    store = RetryingStorage(faulty, attempts=50, sleep=lambda s: None)
    for _ in range(5):
        names = [i.name for i in store.list("index/")]
        assert sorted(names) == sorted(f"index/{i}" for i in range(10))
    assert faulty.faults >= 3


def test_a_workload_through_faults_stays_correct() -> None:
    faulty = FaultyStorage(MemoryStorage(), seed=11, error_rate=0.3)
    store = RetryingStorage(faulty, attempts=15, sleep=lambda s: None)
    for i in range(50):
        store.put(f"data/{i}", bytes([i]) * i)
    assert all(store.get(f"data/{i}") == bytes([i]) * i for i in range(50))
    for i in range(0, 50, 2):
        store.delete(f"data/{i}")
    assert sorted(int(i.name[5:]) for i in store.list("data/")) == list(range(1, 50, 2))
    assert faulty.faults > 30
