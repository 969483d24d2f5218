"""``ReadOnlyStorage``: a view of a backend that refuses every change."""

from __future__ import annotations

from stratavault.errors import PermissionDeniedError
from stratavault.storage._wrapper import StorageWrapper

__all__ = ["ReadOnlyStorage"]


class ReadOnlyStorage(StorageWrapper):
    """Reads pass through; ``put`` and ``delete`` raise :class:`PermissionDeniedError`."""

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Refuse: the storage is read-only."""
        raise PermissionDeniedError(f"put {name} at {self.properties.location} - read-only")

    def delete(self, name: str) -> None:
        """Refuse: the storage is read-only."""
        raise PermissionDeniedError(f"delete {name} at {self.properties.location} - read-only")
