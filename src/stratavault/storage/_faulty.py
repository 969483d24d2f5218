"""``FaultyStorage``: deterministic fault injection, for tests of everything above storage.

Faults, each off by default:

- ``error_rate``: that fraction of calls raise :class:`TransientStorageError`. Half
  of them fail *before* the inner call, half *after* it was done (a put that stored
  the object, a delete that removed it; a list fails after yielding half of the
  objects), which is the ambiguous failure a network gives.
- ``fail_puts_after``: once this many bytes were put, every further put that does not
  fit raises :class:`StorageFullError` and stores nothing.
- ``truncate_gets``: every non-empty get result loses its last byte.
- ``corrupt_gets``: every non-empty get result has one bit flipped.

The random choices come from ``random.Random(seed)``, so a single-threaded test sees
the same faults on every run. ``faults`` counts the faults injected so far.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

from stratavault.errors import StorageFullError, TransientStorageError
from stratavault.storage._base import ObjectInfo, Storage, check_name
from stratavault.storage._wrapper import StorageWrapper

__all__ = ["FaultyStorage"]


class FaultyStorage(StorageWrapper):
    """Wraps a storage and injects the faults described in the module docstring."""

    def __init__(
        self,
        inner: Storage,
        *,
        seed: int,
        error_rate: float = 0.0,
        fail_puts_after: int | None = None,
        truncate_gets: bool = False,
        corrupt_gets: bool = False,
    ) -> None:
        super().__init__(inner)
        self.error_rate = error_rate
        self.fail_puts_after = fail_puts_after
        self.truncate_gets = truncate_gets
        self.corrupt_gets = corrupt_gets
        self.faults = 0
        self.bytes_put = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data``, unless the space budget or an injected error says otherwise."""
        size = memoryview(data).nbytes
        after = self._fail_when(f"put {name}", name)
        with self._lock:
            full = self.fail_puts_after is not None and self.bytes_put + size > self.fail_puts_after
            self.faults += full
        if full:
            raise StorageFullError(
                f"put {name} at {self.properties.location} - no space left (injected)"
            )
        self.inner.put(name, data, overwrite=overwrite)
        with self._lock:
            self.bytes_put += size
        if after:
            raise TransientStorageError(f"put {name} - injected failure after the put was done")

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a range, maybe failing, truncated or corrupted."""
        after = self._fail_when(f"get {name}", name)
        data = self.inner.get(name, offset, length)
        if after:
            raise TransientStorageError(f"get {name} - injected failure after the read")
        if data and (self.truncate_gets or self.corrupt_gets):
            with self._lock:
                self.faults += 1
                bit = self._rng.randrange(len(data) * 8)
            if self.truncate_gets:
                data = data[:-1]
            if self.corrupt_gets and data:
                flipped = bytearray(data)
                flipped[bit // 8 % len(data)] ^= 1 << (bit % 8)
                data = bytes(flipped)
        return data

    def stat(self, name: str) -> ObjectInfo:
        """Name and size, maybe failing."""
        after = self._fail_when(f"stat {name}", name)
        info = self.inner.stat(name)
        if after:
            raise TransientStorageError(f"stat {name} - injected failure after the stat")
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """List objects; an injected failure comes at the start or halfway through."""
        after = self._fail_when(f"list {prefix!r}")
        if not after:
            yield from self.inner.list(prefix)
            return
        found = list(self.inner.list(prefix))
        yield from found[: len(found) // 2]
        raise TransientStorageError(f"list {prefix!r} - injected failure midway")

    def delete(self, name: str) -> None:
        """Remove ``name``, maybe failing before or after."""
        after = self._fail_when(f"delete {name}", name)
        self.inner.delete(name)
        if after:
            raise TransientStorageError(f"delete {name} - injected failure after the delete")

    def _fail_when(self, what: str, name: str | None = None) -> bool:
        """Draw the fault for one call: raise now, or return True to fail after it."""
        if name is not None:
            check_name(name)  # a bad name is a caller's bug, never a transient fault
        with self._lock:
            if self.error_rate <= 0 or self._rng.random() >= self.error_rate:
                return False
            self.faults += 1
            before = self._rng.random() < 0.5
        if before:
            raise TransientStorageError(f"{what} - injected failure")
        return True
