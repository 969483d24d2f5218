from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stratavault.repo import KdfParams, Repository
from stratavault.storage import MemoryStorage, Storage

PASS = b"correct horse battery staple"
SMALL_PACK = 64 * 1024


def open_repo(storage: Storage, cache: Path | None, **options: Any) -> Repository:
    options.setdefault("pack_target_bytes", SMALL_PACK)
    return Repository.open(storage, PASS, cache_dir=cache, **options)


@pytest.fixture
def storage() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def repo(storage: MemoryStorage, cache: Path) -> Iterator[Repository]:
    repository = Repository.init(
        storage, PASS, cache_dir=cache, kdf=KdfParams.fast(), pack_target_bytes=SMALL_PACK
    )
    yield repository
    repository.close()


def random_chunks(count: int, size: int = 10_000) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]
