"""Repository locks: ``locks/<random>`` objects, shared or exclusive, refreshed while held."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from stratavault.errors import ObjectNotFoundError, RepositoryLockedError
from stratavault.repo import _formats as F
from stratavault.repo._crypto import AuthenticationFailed, MasterKeys, compress, decompress
from stratavault.storage import Storage

__all__ = ["LockInfo", "Locker"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class LockInfo:
    """One lock object as read from the backend."""

    name: str
    host: str
    pid: int
    time: float
    exclusive: bool


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Locker:
    """Takes, refreshes, checks and breaks repository locks."""

    def __init__(
        self, storage: Storage, keys: MasterKeys, clock: Clock, refresh_s: float = F.LOCK_REFRESH_S
    ) -> None:
        self._storage = storage
        self._keys = keys
        self._clock = clock
        self._refresh_s = refresh_s
        self.host = socket.gethostname()

    def _encode(self, exclusive: bool) -> bytes:
        doc = {"host": self.host, "pid": os.getpid(), "time": self._clock(), "exclusive": exclusive}
        return self._keys.seal(compress(json.dumps(doc).encode(), 1), F.AD_LOCK)

    def read_all(self) -> Iterator[LockInfo | str]:
        """Every lock; the bare name for an unreadable one (treated as stale)."""
        for obj in self._storage.list(F.LOCKS_PREFIX):
            try:
                raw = self._storage.get(obj.name)
                doc = json.loads(decompress(self._keys.unseal(raw, F.AD_LOCK)))
                yield LockInfo(
                    obj.name, str(doc["host"]), int(doc["pid"]), float(doc["time"]),
                    bool(doc["exclusive"]),
                )  # fmt: skip
            except ObjectNotFoundError:
                continue
            except (AuthenticationFailed, ValueError, KeyError, TypeError):
                yield obj.name

    def is_stale(self, lock: LockInfo) -> bool:
        """Same host with a dead pid, or not refreshed for LOCK_STALE_S seconds."""
        if self._clock() - lock.time > F.LOCK_STALE_S:
            return True
        return lock.host == self.host and not _pid_alive(lock.pid)

    def _conflict(self, exclusive: bool, own: str | None) -> LockInfo | None:
        for lock in self.read_all():
            if isinstance(lock, str) or lock.name == own or self.is_stale(lock):
                continue
            if exclusive or lock.exclusive:
                return lock
        return None

    def _raise_locked(self, holder: LockInfo, exclusive: bool) -> None:
        age = max(0.0, self._clock() - holder.time)
        kind = "exclusive" if holder.exclusive else "shared"
        wanted = "exclusive" if exclusive else "shared"
        raise RepositoryLockedError(
            f"taking {wanted} lock on {self._storage.properties.location} - "
            f"{kind} lock {holder.name} held by {holder.host} pid {holder.pid}, "
            f"refreshed {age:.0f} s ago"
        )

    @contextmanager
    def hold(self, *, exclusive: bool) -> Iterator[None]:
        """Take a lock for the duration of the block; RepositoryLockedError on conflict."""
        holder = self._conflict(exclusive, None)
        if holder is not None:
            self._raise_locked(holder, exclusive)
        name = F.LOCKS_PREFIX + os.urandom(16).hex()
        self._storage.put(name, self._encode(exclusive))
        holder = self._conflict(exclusive, name)  # someone raced us: back off
        if holder is not None:
            self._storage.delete(name)
            self._raise_locked(holder, exclusive)
        stop = threading.Event()
        refresher = threading.Thread(
            target=self._refresh_loop, args=(name, exclusive, stop), daemon=True,
            name="stratavault-lock-refresh",
        )  # fmt: skip
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            refresher.join()
            with suppress(ObjectNotFoundError):
                self._storage.delete(name)

    def _refresh_loop(self, name: str, exclusive: bool, stop: threading.Event) -> None:
        while not stop.wait(self._refresh_s):
            try:
                self._storage.put(name, self._encode(exclusive), overwrite=True)
            except Exception:
                continue

    def break_locks(self, *, stale_only: bool) -> int:
        """Delete stale (or all) locks; return how many were removed."""
        removed = 0
        for lock in list(self.read_all()):
            name = lock if isinstance(lock, str) else lock.name
            if stale_only and not isinstance(lock, str) and not self.is_stale(lock):
                continue
            try:
                self._storage.delete(name)
                removed += 1
            except ObjectNotFoundError:
                continue
        return removed
