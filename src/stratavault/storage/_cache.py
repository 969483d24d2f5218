"""``CachedStorage``: a local copy of a remote repository's small immutable objects."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from stratavault.errors import ObjectNotFoundError
from stratavault.storage._base import ObjectInfo, Storage, check_name
from stratavault.storage._range import check_range
from stratavault.storage._wrapper import StorageWrapper

__all__ = ["CACHED_PREFIXES", "CachedStorage"]

CACHED_PREFIXES = ("config", "keys/", "index/", "snapshots/")
"""Objects kept locally: small, read at every open, never changed once written (their
names are content hashes or random ids). Packs (``data/``) are large and read by range,
and ``locks/`` change: neither is cached. Tree packs share ``data/`` with the others in
format 1, so they are not told apart here."""

_TEMP_PREFIX = ".tmp-"
"""Files being written; no valid object name starts with this."""


class CachedStorage(StorageWrapper):
    """Keeps a copy of every cached object (``CACHED_PREFIXES``) under ``folder``.

    ``get`` of a cached name reads the local copy, or downloads the whole object
    once and keeps it; ``put`` keeps a copy of what it stored; ``delete`` drops the
    copy. ``list`` always asks the backend (so objects removed by other clients are
    seen) and, when a listing of a cached prefix ran to its end, drops the copies of
    objects the backend no longer has or whose size differs. ``stat`` asks the
    backend. Copies are written to a temporary file and renamed, so a crash leaves
    no partial copy. The cache trusts its copies: a damaged one is seen by the
    repository's authentication; deleting the folder is always safe.
    """

    def __init__(self, inner: Storage, folder: Path) -> None:
        super().__init__(inner)
        self.folder = Path(folder)

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data`` in the backend, and a copy of it when ``name`` is cached."""
        path = self._path(name)
        if path is not None and overwrite:
            self._drop(path)  # a failed overwrite must not leave the old copy behind
        self.inner.put(name, data, overwrite=overwrite)
        if path is not None:
            self._keep(path, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """A range of ``name``, from the local copy when there is one."""
        path = self._path(name)
        if path is None:
            return self.inner.get(name, offset, length)
        check_range(name, offset, length)
        try:
            data = path.read_bytes()
        except OSError:
            data = self.inner.get(name)
            self._keep(path, data)
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The backend's listing; afterwards, copies of objects that are gone are dropped."""
        present: dict[str, int] = {}
        for info in self.inner.list(prefix):
            if self._cached(info.name):
                present[info.name] = info.size_bytes
            yield info
        self._prune(prefix, present)

    def delete(self, name: str) -> None:
        """Remove ``name`` from the backend and its local copy."""
        path = self._path(name)
        if path is not None:
            self._drop(path)
        self.inner.delete(name)

    def cached_names(self) -> tuple[str, ...]:
        """Names of the objects that have a local copy, sorted (for tests and reports)."""
        return tuple(sorted(name for name, _ in self._copies("")))

    def _cached(self, name: str) -> bool:
        return name.startswith(CACHED_PREFIXES[1:]) or name == CACHED_PREFIXES[0]

    def _path(self, name: str) -> Path | None:
        return self.folder / name if self._cached(check_name(name)) else None

    def _keep(self, path: Path, data: bytes | memoryview) -> None:
        """Write a copy atomically; a cache that cannot be written is only slower."""
        tmp = path.parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    @staticmethod
    def _drop(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    def _copies(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """Every local copy whose name starts with ``prefix``."""
        for top in CACHED_PREFIXES:
            if not (top.startswith(prefix) or prefix.startswith(top)):
                continue
            base = self.folder / top
            if top == CACHED_PREFIXES[0]:
                if base.is_file() and top.startswith(prefix):
                    yield top, base
                continue
            for folder, _, files in os.walk(base):
                for file in files:
                    path = Path(folder) / file
                    name = path.relative_to(self.folder).as_posix()
                    if not file.startswith(_TEMP_PREFIX) and name.startswith(prefix):
                        yield name, path

    def _prune(self, prefix: str, present: dict[str, int]) -> None:
        for name, path in list(self._copies(prefix)):
            try:
                stale = present.get(name) != path.stat().st_size
            except OSError:
                continue
            if stale:
                self._drop(path)

    def stat(self, name: str) -> ObjectInfo:
        """Name and size of ``name``, from the backend (drops a copy of a vanished object)."""
        try:
            return self.inner.stat(name)
        except ObjectNotFoundError:
            path = self._path(name)
            if path is not None:
                self._drop(path)
            raise
