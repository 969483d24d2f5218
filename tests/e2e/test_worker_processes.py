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


def _listing(repo: Repository, snap: Snapshot, root: Path) -> list[dict[str, Any]]:
    """Every node at or below ``root`` as stored (the folders above it, /tmp among them,
    change as other tests run), but access times (a backup that reads changes them), chunk
    ids (keyed per repository) and so the ids of the folders' listings."""
    nodes = []
    for path, node in list_entries(repo, snap):
        if not Path(path).is_relative_to(root):
            continue
        doc = node.to_json()
        doc.pop("atime_ns")
        doc.pop("subtree", None)
        doc["content"] = [n for _, n in doc.get("content", [])]
        nodes.append({"path": path, **doc})
    return nodes


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


def test_walking_in_a_child_process_gives_the_same_snapshot(tmp_path: Path) -> None:
    """An incremental backup of a large tree walks in a child process: the same listings,
    the same unchanged, changed and new files, unreadable folders reported by path."""
    src = tmp_path / "src"
    src.mkdir()
    build_sample_tree(src)
    locked = src / "locked"
    locked.mkdir()
    (locked / "inside").write_bytes(b"x")
    repos = {
        after: Repository.init(
            LocalStorage(tmp_path / f"repo{after}"), b"pw", cache_dir=None, kdf=KdfParams.fast()
        )
        for after in (0, 10**9)  # 0: walk in a child process when there is a parent
    }
    for repo in repos.values():
        backup_files(repo, BackupFilesOptions(paths=(src,)))
    (src / "docs" / "a.txt").write_text("changed\n")
    (src / "added").write_bytes(os.urandom(5000))
    locked.chmod(0)  # as root the walk still lists it; otherwise an error by path
    try:
        snaps = {
            after: backup_files(
                repo, BackupFilesOptions(paths=(src,), walk_process_after_entries=after)
            )
            for after, repo in repos.items()
        }
    finally:
        locked.chmod(0o755)
    child, here = snaps[0], snaps[10**9]
    assert _listing(repos[0], child, src) == _listing(repos[10**9], here, src)
    assert (child.summary.files_changed, child.summary.files_new) == (1, 1)
    assert child.summary.files_unmodified == here.summary.files_unmodified > 5
    assert [e.path for e in child.errors] == [e.path for e in here.errors]
    target = tmp_path / "restored"
    assert not restore_files(repos[0], child, RestoreOptions(target=target)).issues
    for repo in repos.values():
        repo.close()
    (target / locked.relative_to("/")).chmod(0o755)  # backed up while it was 0
    assert describe(target / src.relative_to("/")) == describe(src)
