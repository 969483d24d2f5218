"""LoadingCache: bounded LRU, one load per missing key however many threads want it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from stratavault._loading_cache import LoadingCache


def test_threads_wanting_a_missing_value_share_one_load() -> None:
    cache: LoadingCache[str, int] = LoadingCache(4)
    started, release = threading.Event(), threading.Event()
    calls = []

    def load() -> int:
        calls.append(1)
        started.set()
        assert release.wait(10)
        return 42

    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(cache.get_or_load, "k", load)
        assert started.wait(10)
        others = [pool.submit(cache.get_or_load, "k", load) for _ in range(7)]
        release.set()
        assert [f.result(10) for f in [first, *others]] == [42] * 8
    assert len(calls) == 1
    assert cache.get_or_load("k", lambda: pytest.fail("cached, not loaded again")) == 42


def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    cache: LoadingCache[str, int] = LoadingCache(4)
    started, release = threading.Event(), threading.Event()

    def load() -> int:
        started.set()
        assert release.wait(10)
        raise OSError("pack unreadable")

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(cache.get_or_load, "k", load)
        assert started.wait(10)
        waiter = pool.submit(cache.get_or_load, "k", load)
        release.set()
        for future in (first, waiter):
            with pytest.raises(OSError, match="pack unreadable"):
                future.result(10)
    assert len(cache) == 0
    assert cache.get_or_load("k", lambda: 7) == 7  # tried again


def test_keyboard_interrupt_in_a_load_does_not_leave_waiters_hanging() -> None:
    cache: LoadingCache[str, int] = LoadingCache(4)
    future = cache.reserve("k")
    assert future is not None

    def interrupted() -> int:
        raise KeyboardInterrupt

    cache.load("k", future, interrupted)  # never raises: the future carries it
    with pytest.raises(KeyboardInterrupt):
        future.result(1)
    assert cache.reserve("k") is not None  # not stuck as loading


def test_least_recently_used_values_are_evicted() -> None:
    cache: LoadingCache[int, int] = LoadingCache(3)
    for key in range(3):
        assert cache.get_or_load(key, lambda key=key: key * 10) == key * 10
    assert cache.get_or_load(0, lambda: pytest.fail("cached")) == 0  # 0 used last now
    cache.put(3, 30)  # evicts 1, the one used longest ago
    assert len(cache) == 3
    assert cache.reserve(1) is not None  # missing: reserved for loading
    assert cache.reserve(0) is None and cache.reserve(2) is None and cache.reserve(3) is None


def test_put_and_abandon_complete_reserved_loads() -> None:
    cache: LoadingCache[str, bytes] = LoadingCache(4)
    mate = cache.reserve("mate")
    assert mate is not None and cache.reserve("mate") is None  # already being loaded
    cache.put("mate", b"came with its frame")  # a loader met it: the waiter gets it
    assert mate.result(1) == b"came with its frame"
    cache.load("mate", mate, lambda: pytest.fail("done already"))
    gone = cache.reserve("gone")
    assert gone is not None
    cache.abandon("gone", gone, ValueError("closed"))
    with pytest.raises(ValueError, match="closed"):
        gone.result(1)


def test_close_drops_values_and_fails_pending_loads() -> None:
    cache: LoadingCache[str, int] = LoadingCache(4)
    cache.put("a", 1)
    pending = cache.reserve("b")
    assert pending is not None
    cache.close(ValueError("reader closed"))
    assert len(cache) == 0
    with pytest.raises(ValueError, match="reader closed"):
        pending.result(1)
    cache.load("b", pending, lambda: 2)  # a worker that runs after the close: nothing happens
    assert len(cache) == 0
