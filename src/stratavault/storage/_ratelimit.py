"""``RateLimitedStorage``: caps upload and download bandwidth with token buckets."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from stratavault.errors import UsageError
from stratavault.storage._base import Storage, StorageProperties
from stratavault.storage._wrapper import StorageWrapper

__all__ = ["RateLimitedStorage", "TokenBucket"]

_BURST_S = 0.1
"""The bucket holds this many seconds' worth of bytes: the most that can pass at once."""


class TokenBucket:
    """Lets ``rate_bytes_per_s`` through on average, shared by all threads that use it.

    ``take(n)`` takes ``n`` tokens at once, going into debt if there are not
    enough, and sleeps until the debt is paid. Callers queue up behind earlier debt,
    so the long-run rate holds however large each request and however many threads.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate_bytes_per_s > 0:
            raise UsageError(f"rate limit must be positive, got {rate_bytes_per_s} bytes/s")
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self._capacity = self.rate_bytes_per_s * _BURST_S
        self._tokens = self._capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Account for ``n`` bytes, sleeping as long as the rate requires."""
        if n <= 0:
            return
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._last)
            self._last = now
            self._tokens = min(self._capacity, self._tokens + elapsed * self.rate_bytes_per_s)
            self._tokens -= n
            wait_s = -self._tokens / self.rate_bytes_per_s
        if wait_s > 0:
            self._sleep(wait_s)


class RateLimitedStorage(StorageWrapper):
    """Limits bytes put and bytes got to the given rates (``None``: no limit).

    A put waits before it is sent, a get after its bytes arrived; each waits as
    long as its size requires at the rate, so the average over a few seconds stays
    within a few percent of the limit. All threads share one bucket per direction.
    """

    def __init__(
        self,
        inner: Storage,
        *,
        upload_bytes_per_s: float | None = None,
        download_bytes_per_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(inner)
        self._up = _bucket(upload_bytes_per_s, clock, sleep)
        self._down = _bucket(download_bytes_per_s, clock, sleep)

    @property
    def properties(self) -> StorageProperties:
        """The inner backend's, but not fork-safe: a forked child would get a bucket of its
        own, and the limit would hold per process."""
        return dataclasses.replace(self.inner.properties, fork_safe=False)

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Wait for upload budget, then store ``data``."""
        if self._up is not None:
            self._up.take(memoryview(data).nbytes)
        self.inner.put(name, data, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a range, then wait until its bytes fit the download budget."""
        data = self.inner.get(name, offset, length)
        if self._down is not None:
            self._down.take(len(data))
        return data


def _bucket(
    rate: float | None, clock: Callable[[], float], sleep: Callable[[float], None]
) -> TokenBucket | None:
    return None if rate is None else TokenBucket(rate, clock=clock, sleep=sleep)
