"""prune stopped at every step (in process) and killed at random moments (SIGKILL), and
backups in other processes running while prune runs: no live data is ever lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stratavault.jobs import check_repository, prune
from stratavault.repo import Repository
from stratavault.snapshot import load_snapshots
from stratavault.storage import MemoryStorage, StorageWrapper
from tests.e2e.conftest import Cli
from tests.e2e.test_prune import (
    PASS,
    backup,
    open_repo,
    restored_digest,
    tree_digest,
    write_tree,
)


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs (not even error handling)."""


class CrashAfter(StorageWrapper):
    """Lets ``budget`` writes and deletes through, then crashes on the next one."""

    def __init__(self, inner: MemoryStorage, budget: int) -> None:
        super().__init__(inner)
        self.budget = budget
        self.ops = 0

    def _step(self) -> None:
        self.ops += 1
        if self.ops > self.budget:
            raise Crash

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        if not name.startswith("locks/"):
            self._step()
        super().put(name, data, overwrite=overwrite)

    def delete(self, name: str) -> None:
        if not name.startswith("locks/"):
            self._step()
        super().delete(name)


def _garbage_repo(tmp_path: Path) -> tuple[MemoryStorage, dict[str, str], Path]:
    """A repository with two kept and three forgotten generations of a tree."""
    from stratavault.repo import KdfParams

    storage = MemoryStorage()
    Repository.init(storage, PASS, cache_dir=None, kdf=KdfParams.fast()).close()
    src = tmp_path / "src"
    kept: dict[str, str] = {}
    with open_repo(storage, tmp_path / "c0") as repo:
        for gen in range(5):
            write_tree(src, 10 + gen % 2, files=8, size=60_000)
            (src / f"f{gen}").write_bytes(os.urandom(60_000))
            sid = backup(repo, src)
            if gen >= 3:
                kept[sid] = tree_digest(src)
        for snap in load_snapshots(repo):
            if snap.id not in kept:
                repo.remove_snapshot(snap.id)
    return storage, kept, src


def _clone(storage: MemoryStorage) -> MemoryStorage:
    copy = MemoryStorage()
    for obj in storage.list():
        copy.put(obj.name, storage.get(obj.name))
    return copy


def _assert_intact(storage: MemoryStorage, kept: dict[str, str], src: Path, tmp: Path) -> None:
    with open_repo(storage, None) as repo:
        damages = check_repository(repo, read_data=True).damages
        assert damages == [], damages
        for n, (sid, digest) in enumerate(kept.items()):
            assert restored_digest(repo, sid, tmp / f"r{n}", src) == digest


def test_prune_stopped_at_every_write_loses_nothing(tmp_path: Path) -> None:
    pristine, kept, src = _garbage_repo(tmp_path)
    probe = CrashAfter(_clone(pristine), budget=10**9)
    with Repository.open(probe, PASS, cache_dir=None, pack_target_bytes=256 << 10) as repo:
        prune(repo, max_unused=0.0)
    total = probe.ops
    assert total >= 8, "prune should write packs, a plan, index objects and delete packs"
    for budget in range(total):
        storage = _clone(pristine)
        crashing = CrashAfter(storage, budget)
        repo = Repository.open(crashing, PASS, cache_dir=None, pack_target_bytes=256 << 10)
        with pytest.raises(Crash):
            prune(repo, max_unused=0.0)
        storage_locks = [o.name for o in storage.list("locks/")]
        for name in storage_locks:  # the "dead" process's lock (a real restart finds it stale)
            storage.delete(name)
        _assert_intact(storage, kept, src, tmp_path / f"b{budget}")
        with open_repo(storage, None) as again:
            prune(again, max_unused=0.0)  # a later prune finishes the work
            done = prune(again, max_unused=0.0)
        assert done.plan is not None and not done.plan.delete and not done.plan.repack
        assert list(storage.list("gc/")) == [], f"budget {budget}: a plan was left"
        _assert_intact(storage, kept, src, tmp_path / f"a{budget}")


def _stratavault() -> str:
    return str(Path(sys.executable).with_name("stratavault"))


def test_prune_killed_at_random_moments(cli: Cli, tmp_path: Path) -> None:
    seed = int(os.environ.get("STRATAVAULT_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    src = tmp_path / "src"
    assert cli("init").code == 0
    env = {**os.environ, **cli.env}
    kills = 0
    for round_ in range(8):
        # Half of the files only in the forgotten snapshot, half in both and in the same
        # packs: prune has to repack (copy the live half) before it can delete.
        write_tree(src, 200 + round_, files=12, size=200_000)
        gone = cli("backup", "files", src, "--json").json_lines()[-1]["snapshot_id"]
        for i in range(6, 12):
            (src / f"f{i}").unlink()
        digest = tree_digest(src)
        assert cli("backup", "files", src, "--tag", "kept").code == 0
        assert cli("forget", str(gone)).code == 0
        proc = subprocess.Popen(
            [_stratavault(), "prune", "--max-unused", "0%", "--limit-upload", "1024"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0.2, 1.2))  # start-up ~0.3-1 s, repacking ~2 s at 1 MiB/s
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        res = cli("check", "--read-data")
        assert res.code == 0, f"seed {seed} round {round_}: {res.out}{res.err}"
        assert cli("restore", "latest", "--target", tmp_path / f"o{round_}").code == 0
        assert tree_digest(tmp_path / f"o{round_}" / src.relative_to("/")) == digest, seed
    assert kills >= 3, f"seed {seed}: prune finished before most kills; slow it down"
    res = cli("prune", "--max-unused", "0%", "--json")
    assert res.code == 0, res.err
    res = cli("prune", "--max-unused", "0%", "--json")
    doc = res.json()
    assert doc["delete_packs"] == 0 and doc["repack_packs"] == 0, (seed, doc)  # type: ignore[index]
    assert cli("check", "--read-data").code == 0


def test_backups_in_other_processes_while_prune_runs(cli: Cli, tmp_path: Path) -> None:
    """Two backup processes keep backing up trees that reuse forgotten data while prune
    runs again and again; afterwards every snapshot restores exactly."""
    assert cli("init").code == 0
    env = {**os.environ, **cli.env}
    sources = [tmp_path / "a", tmp_path / "b"]
    for gen in range(3):  # generations that are then forgotten: garbage to collect
        for n, src in enumerate(sources):
            write_tree(src, 1000 * n + gen, files=6, size=150_000)
            assert cli("backup", "files", src).code == 0
    old = [str(s["id"]) for s in cli("snapshots", "--json").json()]  # type: ignore[attr-defined]
    assert cli("forget", *old).code == 0
    expected: dict[str, str] = {}
    errors: list[str] = []
    prunes = 0

    def backups(n: int, src: Path) -> None:
        """Four backups, and more until two prunes have run beside them (at most 20)."""
        for i in range(20):
            if i >= 4 and prunes >= 2:
                break
            write_tree(src, 1000 * n + i % 3, files=6, size=150_000)  # forgotten content again
            (src / "f6").write_bytes(os.urandom(50_000))
            tag = f"p{n}-{i}"
            expected[tag] = tree_digest(src)
            proc = subprocess.run(
                [_stratavault(), "backup", "files", str(src), "--tag", tag, "-q"],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                errors.append(f"{tag}: {proc.stderr}")

    threads = [threading.Thread(target=backups, args=(n, s)) for n, s in enumerate(sources)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        proc = subprocess.run(
            [_stratavault(), "prune", "--max-unused", "0%", "-q"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        prunes += 1
    for t in threads:
        t.join()
    assert errors == []
    assert prunes >= 2
    assert cli("prune", "--max-unused", "0%").code == 0
    res = cli("check", "--read-data")
    assert res.code == 0, res.out + res.err
    for snap in cli("snapshots", "--json").json():  # type: ignore[attr-defined]
        tag = snap["tags"][0]
        target = tmp_path / "restore" / tag
        assert cli("restore", snap["id"], "--target", target).code == 0
        src = sources[int(tag[1])]
        assert tree_digest(target / src.relative_to("/")) == expected[tag], tag
