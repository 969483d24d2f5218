"""Checks shared by backends."""

from __future__ import annotations

from stratavault.errors import StorageError

__all__ = ["check_range"]


def check_range(name: str, offset: int, length: int | None) -> None:
    """Raise :class:`StorageError` if ``offset`` or ``length`` is negative."""
    if offset < 0 or (length is not None and length < 0):
        raise StorageError(f"get {name} - invalid range offset={offset} length={length}")
