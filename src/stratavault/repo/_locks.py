"""Repository locks: ``locks/<random>`` objects, refreshed while held.

Three modes. ``shared`` (backup, restore, check) conflicts only with ``exclusive``;
``exclusive`` (forget, repair, protect) conflicts with every other lock; ``prune`` conflicts
with ``exclusive`` and other ``prune`` locks but lets backups run beside it: prune's garbage
collection is safe against them by the rule in docs/format.md ("Garbage collection").
"""

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

__all__ = ["EXCLUSIVE", "PRUNE", "SHARED", "LockInfo", "Locker"]

SHARED = "shared"
EXCLUSIVE = "exclusive"
PRUNE = "prune"
_MODES = (SHARED, EXCLUSIVE, PRUNE)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class LockInfo:
    """One lock object as read from the backend."""

    name: str
    host: str
    pid: int
    time: float
    mode: str

    @property
    def exclusive(self) -> bool:
        """Whether this lock excludes every other one."""
        return self.mode == EXCLUSIVE


def conflicts(wanted: str, held: str) -> bool:
    """Whether a lock of mode ``wanted`` may not be taken while one of mode ``held`` exists."""
    if EXCLUSIVE in (wanted, held):
        return True
    return wanted == held == PRUNE


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

    def _encode(self, mode: str) -> bytes:
        doc = {
            "host": self.host,
            "pid": os.getpid(),
            "time": self._clock(),
            "exclusive": mode == EXCLUSIVE,
            "mode": mode,
        }
        return self._keys.seal(compress(json.dumps(doc).encode(), 1), F.AD_LOCK)

    def read_all(self) -> Iterator[LockInfo | str]:
        """Every lock; the bare name for an unreadable one (treated as stale)."""
        for obj in self._storage.list(F.LOCKS_PREFIX):
            try:
                raw = self._storage.get(obj.name)
                doc = json.loads(decompress(self._keys.unseal(raw, F.AD_LOCK)))
                mode = doc.get("mode") or (EXCLUSIVE if doc["exclusive"] else SHARED)
                yield LockInfo(
                    obj.name, str(doc["host"]), int(doc["pid"]), float(doc["time"]),
                    mode if mode in _MODES else EXCLUSIVE,
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

    def live(self, *, own: str | None = None) -> list[LockInfo]:
        """Every readable lock that is not stale, except ``own``."""
        return [
            lock
            for lock in self.read_all()
            if not isinstance(lock, str) and lock.name != own and not self.is_stale(lock)
        ]

    def _conflict(self, mode: str, own: str | None) -> LockInfo | None:
        for lock in self.live(own=own):
            if conflicts(mode, lock.mode):
                return lock
        return None

    def _raise_locked(self, holder: LockInfo, mode: str) -> None:
        age = max(0.0, self._clock() - holder.time)
        raise RepositoryLockedError(
            f"taking {mode} lock on {self._storage.properties.location} - "
            f"{holder.mode} lock {holder.name} held by {holder.host} pid {holder.pid}, "
            f"refreshed {age:.0f} s ago"
        )

    @contextmanager
    def hold(self, mode: str) -> Iterator[str]:
        """Take a lock of ``mode`` for the duration of the block (yields the lock's object
        name); RepositoryLockedError on conflict."""
        holder = self._conflict(mode, None)
        if holder is not None:
            self._raise_locked(holder, mode)
        name = F.LOCKS_PREFIX + os.urandom(16).hex()
        self._storage.put(name, self._encode(mode))
        holder = self._conflict(mode, name)  # someone raced us: back off
        if holder is not None:
            self._storage.delete(name)
            self._raise_locked(holder, mode)
        stop = threading.Event()
        refresher = threading.Thread(
            target=self._refresh_loop, args=(name, mode, stop), daemon=True,
            name="stratavault-lock-refresh",
        )  # fmt: skip
        refresher.start()
        try:
            yield name
        finally:
            stop.set()
            refresher.join()
            with suppress(ObjectNotFoundError):
                self._storage.delete(name)

    def _refresh_loop(self, name: str, mode: str, stop: threading.Event) -> None:
        while not stop.wait(self._refresh_s):
            try:
                self._storage.put(name, self._encode(mode), overwrite=True)
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
