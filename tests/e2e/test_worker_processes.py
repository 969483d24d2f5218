"""Backups that read small files in worker processes give the same snapshots."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

import stratavault.jobs._file_readers as readers_module
from stratavault.jobs import (
    BackupFilesOptions,
    RestoreOptions,
    backup_files,
    list_entries,
    restore_files,
)
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import ContentRun, Snapshot
from stratavault.storage import LocalStorage
from tests.e2e.fstree import build_sample_tree, describe


def _contents(repo: Repository, snap: Snapshot) -> dict[str, list[ContentRun]]:
    """Every file's chunk runs (directory access times differ between runs, contents not)."""
    return {path: node.content for path, node in list_entries(repo, snap) if node.type == "file"}


def test_processes_and_threads_store_the_same_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_sample_tree(src)
    rnd = random.Random(3)
    for i in range(300):
        (src / "small" / f"d{i % 9}").mkdir(parents=True, exist_ok=True)
        data = rnd.randbytes(rnd.randrange(0, 50_000)) if i % 3 else b"same bytes in many files"
        (src / "small" / f"d{i % 9}" / f"f{i}").write_bytes(data)
    storage = LocalStorage(tmp_path / "repo")
    in_threads: list[str] = []
    real = readers_module.chunk_files

    def spy(repo: Repository, paths: list[str], **kwargs: Any) -> Any:
        in_threads.extend(paths)
        return real(repo, paths, **kwargs)

    with Repository.init(storage, b"pw", cache_dir=None, kdf=KdfParams.fast()) as repo:
        monkeypatch.setattr(readers_module, "chunk_files", spy)
        via_processes = backup_files(
            repo, BackupFilesOptions(paths=(src,), processes_after_files=0, force_read=True)
        )
        # Only the files larger than 4 MiB were read in threads; the rest in processes.
        assert sorted(Path(p).name for p in in_threads) == ["big.bin", "sparse.img"]
        via_threads = backup_files(
            repo, BackupFilesOptions(paths=(src,), processes_after_files=10**9, force_read=True)
        )
        assert _contents(repo, via_processes) == _contents(repo, via_threads)
        assert not via_processes.errors
        assert via_threads.summary.chunks_added == 0  # everything was stored the first time
        target = tmp_path / "restored"
        result = restore_files(repo, via_processes, RestoreOptions(target=target, verify=True))
    assert not result.issues
    assert describe(target / src.relative_to("/")) == describe(src)
    assert os.listdir(target / src.relative_to("/") / "small")
