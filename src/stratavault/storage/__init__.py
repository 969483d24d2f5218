"""Storage backends and wrappers: flat stores of named immutable objects.

Backends: :class:`LocalStorage` (a folder), :class:`MemoryStorage` (tests).
Wrappers, each itself a ``Storage`` around another: :class:`RetryingStorage`,
:class:`RateLimitedStorage`, :class:`ReadOnlyStorage`, :class:`AppendOnlyStorage`,
:class:`FaultyStorage` (tests). :func:`open_storage` turns a location string into
a backend.
"""

from stratavault.storage._appendonly import AppendOnlyStorage
from stratavault.storage._base import ObjectInfo, Storage, StorageProperties, check_name
from stratavault.storage._faulty import FaultyStorage
from stratavault.storage._local import LocalStorage
from stratavault.storage._memory import MemoryStorage
from stratavault.storage._open import open_storage
from stratavault.storage._ratelimit import RateLimitedStorage
from stratavault.storage._readonly import ReadOnlyStorage
from stratavault.storage._retry import RetryingStorage
from stratavault.storage._wrapper import StorageWrapper

__all__ = [
    "AppendOnlyStorage",
    "FaultyStorage",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "RateLimitedStorage",
    "ReadOnlyStorage",
    "RetryingStorage",
    "Storage",
    "StorageProperties",
    "StorageWrapper",
    "check_name",
    "open_storage",
]
