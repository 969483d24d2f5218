from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stratavault.errors import RepositoryLockedError
from stratavault.repo import KdfParams, Repository
from stratavault.storage import LocalStorage, MemoryStorage

from .conftest import PASS, open_repo


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def locks(storage: MemoryStorage) -> list[str]:
    return [o.name for o in storage.list("locks/")]


def test_shared_locks_coexist(repo: Repository, storage: MemoryStorage) -> None:
    other = open_repo(storage, None)
    with repo.lock(), other.lock():
        assert len(locks(storage)) == 2
    assert locks(storage) == []


def test_exclusive_conflicts_and_names_holder(repo: Repository, storage: MemoryStorage) -> None:
    other = open_repo(storage, None)
    with repo.lock():
        with pytest.raises(RepositoryLockedError) as err, other.lock(exclusive=True):
            pass
        assert err.value.exit_code == 11
        assert "pid" in str(err.value) and str(os.getpid()) in str(err.value)
    with repo.lock(exclusive=True):
        with pytest.raises(RepositoryLockedError, match="exclusive"), other.lock():
            pass
        with pytest.raises(RepositoryLockedError), other.lock(exclusive=True):
            pass
    assert locks(storage) == []


def test_stale_by_dead_pid(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "repo")
    Repository.init(storage, PASS, cache_dir=None, kdf=KdfParams.fast()).close()
    child = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from stratavault.repo import Repository
        from stratavault.storage import LocalStorage
        repo = Repository.open(LocalStorage(Path({str(tmp_path / "repo")!r})), {PASS!r},
                               cache_dir=None)
        with repo.lock(exclusive=True):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    repo = Repository.open(storage, PASS, cache_dir=None)
    with pytest.raises(RepositoryLockedError, match=f"pid {proc.pid}"), repo.lock():
        pass
    assert repo.break_stale_locks() == 0
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(storage.list("locks/"))) == 1
    with repo.lock(exclusive=True):  # the dead holder's lock does not block
        pass
    assert repo.break_stale_locks() == 1
    assert list(storage.list("locks/")) == []


def test_stale_by_age_with_injected_clock(storage: MemoryStorage, clock: Clock) -> None:
    Repository.init(storage, b"p", cache_dir=None, kdf=KdfParams.fast(), clock=clock).close()
    a = Repository.open(storage, b"p", cache_dir=None, clock=clock, lock_refresh_s=3600)
    b = Repository.open(storage, b"p", cache_dir=None, clock=clock)
    with a.lock(exclusive=True):
        with pytest.raises(RepositoryLockedError, match="refreshed 600 s ago"):
            clock.now += 600
            with b.lock():
                pass
        assert b.break_stale_locks() == 0
        clock.now += 30 * 60
        with b.lock():
            pass
        assert b.break_stale_locks() == 1
    assert locks(storage) == []


def test_lock_is_refreshed(storage: MemoryStorage, clock: Clock) -> None:
    Repository.init(storage, b"p", cache_dir=None, kdf=KdfParams.fast(), clock=clock).close()
    a = Repository.open(storage, b"p", cache_dir=None, clock=clock, lock_refresh_s=0.02)
    b = Repository.open(storage, b"p", cache_dir=None, clock=clock)
    with a.lock(exclusive=True):
        clock.now += 40 * 60  # the lock is stale until the refresher rewrites it
        deadline = time.monotonic() + 30
        while True:
            try:
                with b.lock():
                    pass
            except RepositoryLockedError:
                break  # refreshed with the new time: it holds again
            assert time.monotonic() < deadline, "the lock was not refreshed"
            time.sleep(0.02)


def test_break_locks_removes_all(repo: Repository, storage: MemoryStorage) -> None:
    with repo.lock(), repo.lock():
        assert repo.break_locks() == 2
    assert locks(storage) == []
