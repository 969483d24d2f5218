"""prune: mark and sweep, repacking, deletions that wait for running backups, damage."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from stratavault.errors import DataDamagedError
from stratavault.jobs import (
    BackupFilesOptions,
    Cancellation,
    RestoreOptions,
    backup_files,
    check_repository,
    prune,
    restore_files,
)
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import find_snapshot, load_snapshots
from stratavault.storage import MemoryStorage, Storage
from tests.e2e.conftest import Cli

PASS = b"pw"
PACK = 256 * 1024


def open_repo(storage: Storage, cache: Path | None) -> Repository:
    return Repository.open(storage, PASS, cache_dir=cache, pack_target_bytes=PACK)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[MemoryStorage]:
    mem = MemoryStorage()
    Repository.init(mem, PASS, cache_dir=None, kdf=KdfParams.fast()).close()
    yield mem


def write_tree(root: Path, seed: int, files: int = 12, size: int = 100_000) -> str:
    """Files of random content fixed by ``seed``; returns a digest of the tree."""
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for i in range(files):
        data = hashlib.shake_256(f"{seed}/{i}".encode()).digest(size)
        (root / f"f{i}").write_bytes(data)
        digest.update(data)
    return digest.hexdigest()


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for i in range(len(list(root.iterdir()))):
        digest.update((root / f"f{i}").read_bytes())
    return digest.hexdigest()


def backup(repo: Repository, src: Path, **kw: object) -> str:
    return backup_files(repo, BackupFilesOptions(paths=(src,), host="h", **kw)).id  # type: ignore[arg-type]


def restored_digest(repo: Repository, snapshot_id: str, target: Path, src: Path) -> str:
    snapshot = find_snapshot(repo, snapshot_id)
    restore_files(repo, snapshot, RestoreOptions(target=target, path=str(src)))
    return tree_digest(target)


def data_packs(storage: Storage) -> set[str]:
    return {o.name for o in storage.list("data/")}


def test_prune_deletes_unused_packs_and_repacks_partly_used(
    storage: MemoryStorage, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    with open_repo(storage, tmp_path / "c") as repo:
        write_tree(src, 1)
        first = backup(repo, src)
        for i in range(6):  # a second generation sharing half the files
            (src / f"f{i}").write_bytes(os.urandom(100_000))
        keep_digest = tree_digest(src)
        kept = backup(repo, src)
        before = sum(o.size_bytes for o in storage.list("data/"))
        repo.remove_snapshot(first)
        result = prune(repo, max_unused=0.0)
    assert result.plan is not None and result.deleted_packs > 0
    assert not result.postponed
    after = sum(o.size_bytes for o in storage.list("data/"))
    assert after < before * 0.70  # 12 of 18 file versions stay referenced
    with open_repo(storage, tmp_path / "c2") as repo:
        assert check_repository(repo, read_data=True).damages == []
        assert restored_digest(repo, kept, tmp_path / "out", src) == keep_digest
        again = prune(repo, max_unused=0.0)
        assert again.plan is not None
        assert not again.plan.delete and not again.plan.repack and again.deleted_packs == 0
        assert list(storage.list("gc/")) == []


def test_dry_run_changes_nothing(storage: MemoryStorage, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, 2)
    with open_repo(storage, tmp_path / "c") as repo:
        repo.remove_snapshot(backup(repo, src))
        packs = data_packs(storage)
        result = prune(repo, dry_run=True)
    assert result.plan is not None and len(result.plan.delete) == len(packs)
    assert data_packs(storage) == packs


class _PauseOnce(Cancellation):
    """Holds a backup at its first cancellation check until released (it has its lock
    and its index by then, like a backup that was running when prune started)."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = threading.Event()
        self.release = threading.Event()

    def check(self) -> None:
        if not self.paused.is_set():
            self.paused.set()
            assert self.release.wait(30)
        super().check()


@contextmanager
def _backup_paused_by_prune(
    storage: MemoryStorage, tmp_path: Path, src: Path
) -> Iterator[dict[str, str]]:
    """A backup of ``src`` (another client) that has read the index and waits inside the
    block, then finishes; its snapshot's id is in the yielded dict afterwards."""
    pause = _PauseOnce()
    result: dict[str, str] = {}

    def run_backup() -> None:
        with open_repo(storage, tmp_path / "cb") as repo_b:
            snap = backup_files(repo_b, BackupFilesOptions(paths=(src,), host="b"), cancel=pause)
            result["id"] = snap.id

    thread = threading.Thread(target=run_backup)
    thread.start()
    assert pause.paused.wait(30)
    try:
        yield result
    finally:
        pause.release.set()
        thread.join(60)


def test_backup_running_beside_prune_keeps_its_data(storage: MemoryStorage, tmp_path: Path) -> None:
    """The GC rule end to end: a backup that started before prune rewrote the index and
    deduplicated against chunks prune planned to delete stays complete and restorable."""
    src = tmp_path / "src"
    digest = write_tree(src, 3)
    with open_repo(storage, tmp_path / "c") as repo:
        repo.remove_snapshot(backup(repo, src))  # its chunks are garbage now
    packs = data_packs(storage)
    with _backup_paused_by_prune(storage, tmp_path, src) as result:
        with open_repo(storage, tmp_path / "c") as repo:
            first = prune(repo, max_unused=0.0)
        assert first.postponed and first.deleted_packs == 0  # its lock blocks deletion
        assert data_packs(storage) == packs
        assert len(list(storage.list("gc/"))) == 1
    with open_repo(storage, tmp_path / "c3") as repo:
        # The snapshot uses chunks that are out of the index but still there: readable now.
        assert check_repository(repo, read_data=True).damages == []
        second = prune(repo, max_unused=0.0)
        assert second.finished and second.finished[0].restored_packs
        assert list(storage.list("gc/")) == []
    with open_repo(storage, tmp_path / "c4") as repo:
        assert check_repository(repo, read_data=True).damages == []
        assert restored_digest(repo, result["id"], tmp_path / "out", src) == digest


def test_a_reader_opened_before_prune_puts_planned_packs_back_still_finds_them(
    storage: MemoryStorage, tmp_path: Path
) -> None:
    """A reader opens while a snapshot's packs are out of the index (a plan names them);
    before it reads, the next prune puts them back into the index and drops the plan. The
    reader's index lacks them and no plan names them any more: it must look again, not
    report them missing (check and restore said "not in the index" beside prune)."""
    src = tmp_path / "src"
    digest = write_tree(src, 3)
    with open_repo(storage, tmp_path / "c") as repo:
        repo.remove_snapshot(backup(repo, src))  # its chunks are garbage now
    # The backup read the index before prune: it deduplicates against the planned packs.
    with (
        _backup_paused_by_prune(storage, tmp_path, src) as result,
        open_repo(storage, tmp_path / "c") as repo,
    ):
        assert prune(repo, max_unused=0.0).postponed  # out of the index, in a plan
    snap = result["id"]
    with open_repo(storage, None) as reader:
        with open_repo(storage, tmp_path / "c") as repo:
            done = prune(repo, max_unused=0.0)
        assert done.finished[0].restored_packs and list(storage.list("gc/")) == []
        assert restored_digest(reader, snap, tmp_path / "out", src) == digest
        assert check_repository(reader, read_data=True).damages == []


def test_backup_after_index_rewrite_does_not_reuse_planned_packs(
    storage: MemoryStorage, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    digest = write_tree(src, 4)
    with open_repo(storage, tmp_path / "c") as repo:
        repo.remove_snapshot(backup(repo, src))
    holder = open_repo(storage, tmp_path / "ch")
    with holder.lock():  # some other client keeps the deletion pending
        with open_repo(storage, tmp_path / "c") as repo:
            assert prune(repo, max_unused=0.0).postponed
        planned = data_packs(storage)
        with open_repo(storage, tmp_path / "cb") as repo_b:  # starts after the rewrite
            snap = backup(repo_b, src)
        assert data_packs(storage) - planned, "the new backup must upload its own copy"
    holder.close()
    with open_repo(storage, tmp_path / "c") as repo:
        done = prune(repo, max_unused=0.0)
    assert done.deleted_packs == len(planned) and not done.finished[0].restored_packs
    with open_repo(storage, tmp_path / "c5") as repo:
        assert check_repository(repo, read_data=True).damages == []
        assert restored_digest(repo, snap, tmp_path / "out", src) == digest


@pytest.mark.parametrize(("pick", "match"), [(max, "in no pack"), (min, "")])
def test_prune_refuses_when_a_pack_it_needs_is_missing(
    storage: MemoryStorage, tmp_path: Path, pick: Any, match: str
) -> None:
    """The largest pack holds file data: the mark finds chunks "in no pack". The smallest
    is the tree pack: reading the trees fails, naming it. Nothing is deleted either way."""
    src = tmp_path / "src"
    write_tree(src, 5)
    with open_repo(storage, tmp_path / "c") as repo:
        backup(repo, src)
        gone = pick(storage.list("data/"), key=lambda info: info.size_bytes).name
        storage.delete(gone)
        before = data_packs(storage)
        with pytest.raises(DataDamagedError, match=match or gone):
            prune(repo)
    assert data_packs(storage) == before


def test_forget_prune_from_the_cli(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert cli("init").code == 0
    write_tree(src, 6)
    assert cli("backup", "files", src).code == 0
    digest = write_tree(src, 7)
    assert cli("backup", "files", src).code == 0
    res = cli("forget", "--keep-last", "1", "--prune", "--max-unused", "0%", "--json")
    assert res.code == 0, res.err
    docs = res.json_lines()
    assert docs[-1]["message_type"] == "prune" and docs[-1]["deleted_packs"]
    assert cli("check", "--read-data").code == 0
    assert cli("restore", "latest", "--target", tmp_path / "out").code == 0
    assert tree_digest(tmp_path / "out" / src.relative_to("/")) == digest
    res = cli("prune", "--dry-run", "--json")
    assert res.code == 0 and res.json()["delete_packs"] == 0  # type: ignore[index]


def test_prune_option_errors(cli: Cli) -> None:
    assert cli("init").code == 0
    res = cli("prune", "--max-unused", "150%")
    assert res.code == 2 and "percentage" in res.err


def test_snapshots_survive_many_prunes(storage: MemoryStorage, tmp_path: Path) -> None:
    """Generations come and go; every kept snapshot stays exact through each prune."""
    src = tmp_path / "src"
    digests: dict[str, str] = {}
    with open_repo(storage, tmp_path / "c") as repo:
        for gen in range(6):
            digest = write_tree(src, 100 + gen % 3, files=6)
            (src / f"f{gen % 6}").write_bytes(os.urandom(50_000))
            digests[backup(repo, src)] = tree_digest(src)
            assert digest
            snaps = load_snapshots(repo)
            if len(snaps) > 2:
                repo.remove_snapshot(snaps[0].id)
                digests.pop(snaps[0].id)
            prune(repo, max_unused=0.1)
    with open_repo(storage, tmp_path / "c6") as repo:
        assert check_repository(repo, read_data=True).damages == []
        for n, (sid, digest) in enumerate(digests.items()):
            assert restored_digest(repo, sid, tmp_path / f"o{n}", src) == digest
