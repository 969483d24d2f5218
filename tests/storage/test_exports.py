"""The public face of stratavault.storage."""

from __future__ import annotations

import stratavault.storage as storage


def test_exported_members() -> None:
    assert sorted(storage.__all__) == [
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
        "TEMP_PREFIX",
        "check_name",
        "open_storage",
    ]
    for name in storage.__all__:
        assert getattr(storage, name).__doc__
