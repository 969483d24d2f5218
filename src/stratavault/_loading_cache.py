"""A bounded LRU cache whose misses are loaded once, however many threads want them.

The pattern of the repository's frame cache and of a disk reader's chunk cache: a value
missing from the cache is loaded by the first thread that wants it (or by a read-ahead
worker that reserved it); every other thread that wants it meanwhile waits for that load
and gets its value or its error. A loader may :meth:`LoadingCache.put` other values it
came across (the other chunks of a frame it decoded), which also wakes their waiters.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError
from typing import Generic, TypeVar

__all__ = ["LoadingCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LoadingCache(Generic[K, V]):
    """At most ``capacity`` values, the one used longest ago evicted first; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, Future[V]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many values are cached."""
        return len(self._values)

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        """The value of ``key``: cached, being loaded (waited for), or loaded now by
        ``load`` in this thread. The loader's error is raised here and in every thread
        that waited for it; nothing is cached then."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            future = self._loading.get(key)
            owner = future is None
            if future is None:
                future = self._loading[key] = Future()
        if owner:
            self.load(key, future, load)
        return future.result()

    def reserve(self, key: K) -> Future[V] | None:
        """For loading ahead: a future that the caller must complete with :meth:`load` (or
        :meth:`abandon`) when ``key`` is neither cached (it is marked used) nor being
        loaded; ``None`` otherwise."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return None
            if key in self._loading:
                return None
            future = self._loading[key] = Future()
            return future

    def load(self, key: K, future: Future[V], load: Callable[[], V]) -> None:
        """Complete ``future`` (reserved for ``key``) with ``load()``'s value, which is
        cached, or with its error. Does nothing when a :meth:`put` completed it already.
        Never raises: the future carries the error."""
        if future.done():
            return
        try:
            value = load()
        except BaseException as exc:  # KeyboardInterrupt too: waiters must not hang
            with self._lock:
                if self._loading.get(key) is future:
                    del self._loading[key]
            with contextlib.suppress(InvalidStateError):  # abandoned meanwhile
                future.set_exception(exc)
            return
        self.put(key, value)

    def put(self, key: K, value: V) -> None:
        """Cache ``value`` as the one used last and hand it to whoever waits for ``key``."""
        with self._lock:
            waiting = self._loading.pop(key, None)
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)
        if waiting is not None:
            with contextlib.suppress(InvalidStateError):
                waiting.set_result(value)

    def abandon(self, key: K, future: Future[V], error: BaseException) -> None:
        """Give up a reserved load: its waiters get ``error``."""
        with self._lock:
            if self._loading.get(key) is future:
                del self._loading[key]
        with contextlib.suppress(InvalidStateError):
            future.set_exception(error)

    def close(self, error: BaseException) -> None:
        """Drop every value; loads still pending end with ``error`` for their waiters."""
        with self._lock:
            self._values.clear()
            pending = list(self._loading.items())
            self._loading.clear()
        for _key, future in pending:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(error)
