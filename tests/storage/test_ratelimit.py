"""RateLimitedStorage and its token bucket: accuracy without and with real time."""

from __future__ import annotations

import threading
import time

import pytest

from stratavault.errors import UsageError
from stratavault.storage import MemoryStorage, RateLimitedStorage

KIB = 1024


class FakeClock:
    """A clock that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.slept += seconds


def test_upload_rate_with_injected_clock() -> None:
    clock = FakeClock()
    store = RateLimitedStorage(
        MemoryStorage(), upload_bytes_per_s=100 * KIB, clock=clock, sleep=clock.sleep
    )
    for i in range(50):
        store.put(f"data/{i}", bytes(10 * KIB))  # 500 KiB at 100 KiB/s: 5 s
    assert clock.now - 1000 == pytest.approx(5.0, rel=0.05)
    before = clock.now
    for i in range(50):
        store.get(f"data/{i}")  # downloads are not limited
    assert clock.now == before


def test_download_rate_and_ranges_with_injected_clock() -> None:
    clock = FakeClock()
    store = RateLimitedStorage(
        MemoryStorage(), download_bytes_per_s=1 << 20, clock=clock, sleep=clock.sleep
    )
    store.put("big", bytes(4 << 20))
    assert clock.now == 1000.0  # uploads are not limited
    store.get("big")
    for _ in range(16):
        store.get("big", 0, 256 * KIB)
    store.get("big", (4 << 20) - 10, 1 << 20)  # clipped: only 10 bytes count
    assert clock.now - 1000 == pytest.approx(8.0, rel=0.05)


def test_idle_time_does_not_bank_a_large_burst() -> None:
    clock = FakeClock()
    store = RateLimitedStorage(
        MemoryStorage(), upload_bytes_per_s=100 * KIB, clock=clock, sleep=clock.sleep
    )
    clock.now += 3600  # an hour idle
    start = clock.now
    for i in range(20):
        store.put(f"d{i}", bytes(10 * KIB))  # 200 KiB: ~2 s minus a 0.1 s burst
    assert clock.now - start == pytest.approx(1.9, rel=0.05)


def test_many_threads_share_one_budget_in_real_time() -> None:
    rate = 2 << 20
    store = RateLimitedStorage(MemoryStorage(), upload_bytes_per_s=rate)
    blob = bytes(64 * KIB)
    per_thread = 8

    def worker(t: int) -> None:
        for i in range(per_thread):
            store.put(f"data/{t}/{i}", blob)

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    expected = (32 * len(blob) - rate * 0.1) / rate  # 2 MiB at 2 MiB/s, minus the burst
    # One budget: not faster than the rate (four budgets would take a quarter of the time);
    # the upper bound only catches gross over-throttling (a busy machine adds delays).
    assert expected * 0.95 <= elapsed < expected * 2, elapsed


def test_bad_rate_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        RateLimitedStorage(MemoryStorage(), upload_bytes_per_s=0)
