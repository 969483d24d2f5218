"""``MemoryStorage``: objects in a dict, for tests and throwaway repositories."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from stratavault.errors import ObjectExistsError, ObjectNotFoundError
from stratavault.storage._base import ObjectInfo, StorageProperties, check_name, put_file_content
from stratavault.storage._range import check_range

__all__ = ["MemoryStorage"]


class MemoryStorage:
    """A thread-safe in-memory backend; its contents vanish with the object (not durable)."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._properties = StorageProperties(
            location="memory:", conditional_create=True, durable=False
        )

    @property
    def properties(self) -> StorageProperties:
        """Location ``memory:``; conditional create; not durable."""
        return self._properties

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store a copy of ``data`` under ``name`` (see ``Storage.put``)."""
        check_name(name)
        blob = bytes(data)
        with self._lock:
            if not overwrite and name in self._objects:
                raise ObjectExistsError(f"put {name} at memory: - object exists")
            self._objects[name] = blob

    def put_file(self, name: str, path: str, *, overwrite: bool = False) -> None:
        """Store a copy of the file's content (see ``Storage.put_file``)."""
        put_file_content(self, name, path, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return a range of ``name`` (see ``Storage.get``)."""
        check_name(name)
        check_range(name, offset, length)
        blob = self._lookup(name, "get")
        end = len(blob) if length is None else offset + length
        return blob[offset:end]

    def stat(self, name: str) -> ObjectInfo:
        """Name and size of ``name``."""
        check_name(name)
        return ObjectInfo(name, len(self._lookup(name, "stat")))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose names start with ``prefix``, as they were when the call started."""
        with self._lock:
            items = list(self._objects.items())
        found = [ObjectInfo(n, len(b)) for n, b in items if n.startswith(prefix)]
        return iter(found)

    def delete(self, name: str) -> None:
        """Remove ``name``."""
        check_name(name)
        with self._lock:
            if self._objects.pop(name, None) is None:
                raise ObjectNotFoundError(f"delete {name} at memory: - no such object")

    def close(self) -> None:
        """Nothing to release; the objects stay readable."""

    def _lookup(self, name: str, operation: str) -> bytes:
        with self._lock:
            blob = self._objects.get(name)
        if blob is None:
            raise ObjectNotFoundError(f"{operation} {name} at memory: - no such object")
        return blob

    def __repr__(self) -> str:
        return f"MemoryStorage({len(self._objects)} objects)"
