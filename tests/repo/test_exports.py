from __future__ import annotations

import os

import pytest

import stratavault.repo
from stratavault.repo import Repository


def test_public_names_are_pinned() -> None:
    assert sorted(stratavault.repo.__all__) == [
        "ChunkInfo",
        "ChunkSealer",
        "DerivedKeys",
        "GcPlan",
        "GcResult",
        "KdfParams",
        "KeyInfo",
        "LockInfo",
        "PendingDeletion",
        "RepoStats",
        "Repository",
        "Unlocked",
        "default_cache_dir",
        "unlock_repository",
    ]


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert str(stratavault.repo.default_cache_dir()) == "/x/cache/stratavault"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(stratavault.repo.default_cache_dir()).endswith(".cache/stratavault")


def test_memoryview_chunks(repo: Repository) -> None:
    buf = bytearray(os.urandom(300_000))
    view = memoryview(buf)[1000:201_000]
    cid = repo.chunk_id(view)
    assert repo.add_chunk(cid, view) > 0
    repo.flush()
    assert repo.read_chunk(cid) == bytes(view)
