"""Storage backends and wrappers: flat stores of named immutable objects.

Backends: :class:`LocalStorage` (a folder), :class:`S3Storage` (a bucket of any
S3-compatible store), :class:`MemoryStorage` (tests). Wrappers, each itself a
``Storage`` around another: :class:`RetryingStorage`, :class:`RateLimitedStorage`,
:class:`ReadOnlyStorage`, :class:`AppendOnlyStorage`, :class:`CachedStorage` (local
copies of a remote repository's metadata), :class:`FaultyStorage` (tests).
:func:`open_storage` turns a location string into a backend.
"""

from stratavault.storage._appendonly import AppendOnlyStorage
from stratavault.storage._base import ObjectInfo, Storage, StorageProperties, check_name
from stratavault.storage._cache import CachedStorage
from stratavault.storage._faulty import FaultyStorage
from stratavault.storage._local import LocalStorage
from stratavault.storage._memory import MemoryStorage
from stratavault.storage._open import open_storage
from stratavault.storage._ratelimit import RateLimitedStorage
from stratavault.storage._readonly import ReadOnlyStorage
from stratavault.storage._retry import RetryingStorage
from stratavault.storage._s3 import S3Storage
from stratavault.storage._wrapper import StorageWrapper

__all__ = [
    "AppendOnlyStorage",
    "CachedStorage",
    "FaultyStorage",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "RateLimitedStorage",
    "ReadOnlyStorage",
    "RetryingStorage",
    "S3Storage",
    "Storage",
    "StorageProperties",
    "StorageWrapper",
    "check_name",
    "open_storage",
]
