"""A base for wrappers: a ``Storage`` that passes every call to an inner one."""

from __future__ import annotations

from collections.abc import Iterator

from stratavault.storage._base import ObjectInfo, Storage, StorageProperties, put_file_content

__all__ = ["StorageWrapper"]


class StorageWrapper:
    """Forwards every ``Storage`` call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    @property
    def properties(self) -> StorageProperties:
        """The inner backend's properties."""
        return self.inner.properties

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data`` under ``name`` in the inner backend."""
        self.inner.put(name, data, overwrite=overwrite)

    def put_file(self, name: str, path: str, *, overwrite: bool = False) -> None:
        """Store the file's content with this wrapper's ``put``, so that what a subclass
        does to writes applies; a wrapper that changes nothing passes the file on."""
        if type(self).put is StorageWrapper.put:
            self.inner.put_file(name, path, overwrite=overwrite)
        else:
            put_file_content(self, name, path, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a range of ``name`` from the inner backend."""
        return self.inner.get(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        """Name and size of ``name`` in the inner backend."""
        return self.inner.stat(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects of the inner backend whose names start with ``prefix``."""
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        """Remove ``name`` from the inner backend."""
        self.inner.delete(name)

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"
