"""``RetryingStorage``: retries calls that failed transiently, with exponential backoff."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from stratavault.errors import ObjectExistsError, ObjectNotFoundError, TransientStorageError
from stratavault.storage._base import ObjectInfo, Storage
from stratavault.storage._wrapper import StorageWrapper

__all__ = ["RetryingStorage"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

_WRITE_ERRORS: tuple[type[BaseException], ...] = (TransientStorageError,)
_READ_ERRORS: tuple[type[BaseException], ...] = (
    TransientStorageError,
    ConnectionError,
    TimeoutError,
)


class RetryingStorage(StorageWrapper):
    """Retries each call up to ``attempts`` times in all while it fails transiently.

    Every call retries :class:`TransientStorageError`; reads (``get``, ``stat``,
    ``list``) also retry ``ConnectionError`` and ``TimeoutError``, which are harmless
    to repeat. Between attempts it sleeps ``backoff_s * 2**n`` (at most
    ``max_backoff_s``) times a random factor in [0.5, 1] so that clients do not retry
    in lockstep. After the last attempt the last error is raised.

    A transient error may come *after* the backend did the work (the connection
    broke before the answer arrived), so a retry can find the work done:

    - ``put(overwrite=False)`` retried finds the object present with the size of our
      data: it counts as success. Objects are named by the hash of their content
      (and other names such as locks carry random ids), so an object of that name and
      size is our own earlier attempt; reading it back to compare would cost a
      download of every such object.
    - ``delete`` retried finds no object: it counts as success, since the object is
      gone, which is what the caller asked for.
    - a ``list`` that fails midway is restarted, and names already yielded are not
      yielded again (it remembers the names yielded so far).
    """

    def __init__(
        self,
        inner: Storage,
        *,
        attempts: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._rng = rng or random.Random()

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data``, retrying transient failures (see the class docstring)."""
        size = memoryview(data).nbytes
        tried = False

        def attempt() -> None:
            nonlocal tried
            retry, tried = tried, True
            try:
                self.inner.put(name, data, overwrite=overwrite)
            except ObjectExistsError:
                if not (retry and self.inner.stat(name).size_bytes == size):
                    raise
                _log.info("put %s: found after an ambiguous failure, counted as done", name)

        self._call(f"put {name}", attempt, _WRITE_ERRORS)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a range, retrying transient failures."""
        return self._call(f"get {name}", lambda: self.inner.get(name, offset, length), _READ_ERRORS)

    def stat(self, name: str) -> ObjectInfo:
        """Name and size, retrying transient failures."""
        return self._call(f"stat {name}", lambda: self.inner.stat(name), _READ_ERRORS)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """List objects, restarting after transient failures without repeating names."""
        seen: set[str] = set()
        for n in range(self.attempts):
            try:
                for info in self.inner.list(prefix):
                    if info.name not in seen:
                        seen.add(info.name)
                        yield info
                return
            except _READ_ERRORS as e:
                self._after_failure(f"list {prefix!r}", n, e)

    def delete(self, name: str) -> None:
        """Remove ``name``, retrying transient failures (see the class docstring)."""
        tried = False

        def attempt() -> None:
            nonlocal tried
            retry, tried = tried, True
            try:
                self.inner.delete(name)
            except ObjectNotFoundError:
                if not retry:
                    raise
                _log.info("delete %s: gone after an ambiguous failure, counted as done", name)

        self._call(f"delete {name}", attempt, _WRITE_ERRORS)

    def delay_s(self, failures: int) -> float:
        """The pause after ``failures`` failed attempts (1 for the first), before jitter."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1)))

    def _call(self, what: str, fn: Callable[[], _T], errors: tuple[type[BaseException], ...]) -> _T:
        n = 0
        while True:
            try:
                return fn()
            except errors as e:
                self._after_failure(what, n, e)
                n += 1

    def _after_failure(self, what: str, n: int, error: BaseException) -> None:
        """Re-raise ``error`` after the last attempt, else log it and sleep before the next."""
        if n + 1 >= self.attempts:
            raise error
        delay = self.delay_s(n + 1) * self._rng.uniform(0.5, 1.0)
        _log.warning(
            "%s failed (%s), retry %d/%d in %.2fs", what, error, n + 1, self.attempts - 1, delay
        )
        self._sleep(delay)
