"""Storage backends and wrappers: flat stores of named immutable objects.

Backends: :class:`LocalStorage` (a folder), :class:`S3Storage` (a bucket of any
S3-compatible store), :class:`MemoryStorage` (tests). Wrappers, each itself a
``Storage`` around another: :class:`RetryingStorage`, :class:`RateLimitedStorage`,
:class:`ReadOnlyStorage`, :class:`AppendOnlyStorage`, :class:`CachedStorage` (local
copies of a remote repository's metadata), :class:`FaultyStorage` (tests).
:func:`open_storage` turns a location string into a backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stratavault._lazy import lazy_exports

if TYPE_CHECKING:
    from stratavault.storage._appendonly import AppendOnlyStorage as AppendOnlyStorage
    from stratavault.storage._base import (
        ObjectInfo as ObjectInfo,
        Storage as Storage,
        StorageProperties as StorageProperties,
        check_name as check_name,
    )
    from stratavault.storage._cache import CachedStorage as CachedStorage
    from stratavault.storage._faulty import FaultyStorage as FaultyStorage
    from stratavault.storage._local import TEMP_PREFIX as TEMP_PREFIX, LocalStorage as LocalStorage
    from stratavault.storage._memory import MemoryStorage as MemoryStorage
    from stratavault.storage._open import open_storage as open_storage
    from stratavault.storage._ratelimit import RateLimitedStorage as RateLimitedStorage
    from stratavault.storage._readonly import ReadOnlyStorage as ReadOnlyStorage
    from stratavault.storage._retry import RetryingStorage as RetryingStorage
    from stratavault.storage._s3 import S3Storage as S3Storage
    from stratavault.storage._wrapper import StorageWrapper as StorageWrapper

__all__, __getattr__ = lazy_exports(__name__, __file__)
