"""Crash campaign: ``stratavault backup files`` killed with SIGKILL at many random moments.

One repository, rounds in sequence: each round changes the source tree, starts a real
``stratavault backup files`` process and kills it with SIGKILL at a moment drawn from a
seeded generator: at a random moment (a fraction of the time an incremental backup
takes to reach its snapshot on this machine, measured in the campaign, so that the kills
land on a fast machine too), right when (or a few ms after) the backend creates the
temporary file of an index object or the snapshot object, or while the process fills its
n-th pack. The temporary files of ``LocalStorage`` (``.tmp-*``, in the
object's own folder) are watched with inotify, so the kill lands while the object is being
written, and a temporary file left behind proves it. A pack is filled in a file of its own
(anonymous, in the repository's folder: ``REPO/#N (deleted)`` among the process's open
files, polled every millisecond) and then linked into place; that file still open when the
kill is sent proves it for packs. Each targeted kind must be hit at least once, so the
campaign cannot pass vacuously.

After each kill: ``check --read-data`` passes, every snapshot not seen before restores and
matches the source, and the next backup completes and does not store again the packs
that had landed. ``STRATAVAULT_CRASH_SEED=<n>`` replays a campaign; failures print the seed.
"""

from __future__ import annotations

import contextlib
import ctypes
import filecmp
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import Cli

TEMP_PREFIX = ".tmp-"
"""How LocalStorage names a file being written (``TEMP_PREFIX`` of storage/_local.py, private
there; were it to change, no kill would count as a hit and the campaign would fail)."""

ROUNDS = 28
MIN_KILLS = 20
FILES = 24
FILE_BYTES = 5 << 19  # 2.5 MiB: the tree is 60 MiB of random data, about four 16 MiB packs
KINDS = ("pack", "index", "snapshot")
_IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")


class _TempWatch:
    """inotify (through ctypes) on the repository's object folders: reports each
    temporary file as it is created, with the kind of object being written."""

    def __init__(self, repo: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, f"inotify_init1: errno {ctypes.get_errno()}"
        folders = {repo / "index": "index", repo / "snapshots": "snapshot"}
        for i in range(256):  # LocalStorage makes data/xx on demand; make all now to watch them
            folders[repo / "data" / f"{i:02x}"] = "pack"
        self.kinds: dict[int, tuple[Path, str]] = {}
        for folder, kind in folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            wd = libc.inotify_add_watch(self.fd, bytes(folder), _IN_CREATE)
            assert wd >= 0, f"inotify_add_watch {folder}: errno {ctypes.get_errno()}"
            self.kinds[wd] = (folder, kind)

    def wait(self, timeout_s: float) -> list[tuple[str, Path]]:
        """Temporary files created since the last call (waits up to ``timeout_s``)."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return []
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        found, offset = [], 0
        while offset < len(buf):
            wd, _mask, _cookie, length = _EVENT.unpack_from(buf, offset)
            name = buf[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if wd in self.kinds and name.startswith(TEMP_PREFIX.encode()):
                folder, kind = self.kinds[wd]
                found.append((kind, folder / name.decode()))
        return found

    def drain(self) -> None:
        """Forget events so far (of earlier runs)."""
        while self.wait(0):
            pass

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Plan:
    """When to kill: the ``occurrence``-th temp file of ``kind`` (for ``pack``, the
    ``occurrence``-th pack file seen open), + ``delay_s``; or, when ``kind`` is ``time``,
    after ``fraction`` of the time an incremental backup has been seen to take on this
    machine to reach its snapshot (``delay_s`` is set from it when the round starts)."""

    kind: str
    occurrence: int = 1
    delay_s: float = 0.0
    fraction: float = 0.0

    def __str__(self) -> str:
        if self.kind == "time":
            return f"after {self.delay_s * 1000:.0f} ms ({self.fraction:.2f} of a backup)"
        return f"{self.kind} #{self.occurrence} (+{self.delay_s * 1000:.0f} ms)"


def _plans(rng: random.Random) -> list[_Plan]:
    """Six kills of each kind and the rest at random moments, in random order. The first
    round (a full backup) targets a pack in the middle of the run; the second kills as
    the snapshot is written, which measures how long an incremental backup takes before
    any kill is timed (how long depends on the machine: 0.2-0.5 s on those seen)."""
    plans = [_Plan("pack", rng.randint(3, 5), rng.choice([0.0, 0.002, 0.01])), _Plan("snapshot")]
    for _ in range(5):
        plans.append(_Plan("pack", rng.randint(1, 2), rng.choice([0.0, 0.001, 0.004])))
    plans += [_Plan("index") for _ in range(6)] + [_Plan("snapshot") for _ in range(5)]
    plans += [_Plan("time", fraction=rng.uniform(0.05, 1.0)) for _ in range(ROUNDS - 18)]
    rest = plans[2:]
    rng.shuffle(rest)
    return [*plans[:2], *rest]


@pytest.fixture(scope="session")
def crash_base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 MiB of incompressible data in a few folders, generated once per session."""
    root = tmp_path_factory.mktemp("crash-base")
    gen = np.random.default_rng(1)
    for i in range(FILES):
        sub = root / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:02d}.bin").write_bytes(gen.bytes(FILE_BYTES))
    return root


def _copy_tree(base: Path, src: Path) -> None:
    """A copy that shares the base's files (changes replace files, never write into them)."""
    shutil.copytree(base, src, copy_function=os.link)


def _change_tree(src: Path, rng: random.Random, gen: np.random.Generator) -> int:
    """Replace a few files with new random content (now and then many, so that full packs
    are written mid-backup) and add a small one; return the new bytes."""
    files = sorted(p for p in src.rglob("*.bin"))
    count = 8 if rng.random() < 0.2 else rng.randint(1, 3)
    new = 0
    for path in rng.sample(files, count):
        tmp = path.with_suffix(".new")
        tmp.write_bytes(gen.bytes(FILE_BYTES))
        os.replace(tmp, path)
        new += FILE_BYTES
    note = src / f"d{rng.randrange(3)}" / f"note{rng.randrange(1 << 30)}.txt"
    note.write_bytes(gen.bytes(rng.randint(1, 5000)))
    return new + note.stat().st_size


def _files(repo: Path, folder: str) -> dict[Path, int]:
    """The objects in a folder (not temporary files), with their sizes."""
    found = (repo / folder).rglob("*")
    return {p: p.stat().st_size for p in found if p.is_file() and TEMP_PREFIX not in p.name}


def _pack_files(pid: int, repo: Path) -> set[str]:
    """The pack files process ``pid`` has open: anonymous ones in the repository's folder
    (``REPO/#N (deleted)``) or named ``.tmp-pack-*`` ones."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(f"{repo}/#") or "/.tmp-pack-" in target:
                    found.add(target)
    return found


def _kill_backup(cli: Cli, src: Path, watch: _TempWatch, plan: _Plan) -> tuple[bool, str, float]:
    """Run a backup and kill it as planned; return (killed, what happened: "killed" or
    "killed while filling a pack", or "completed before the kill", seconds from the start
    to the kill or to the end)."""
    exe = Path(sys.executable).with_name("stratavault")
    watch.drain()
    proc = subprocess.Popen(
        [str(exe), "backup", "files", str(src), "-q"],
        env={**os.environ, **cli.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started, seen, packs = time.monotonic(), Counter[str](), set[str]()
    try:
        while proc.poll() is None:
            assert time.monotonic() - started < 60, "backup neither ended nor was killed"
            if plan.kind == "time":
                if time.monotonic() >= started + plan.delay_s:
                    break
                time.sleep(0.002)
            elif plan.kind == "pack":
                packs |= _pack_files(proc.pid, cli.repo)
                if len(packs) >= plan.occurrence:
                    time.sleep(plan.delay_s)
                    break
                time.sleep(0.001)
            elif any(_fires(plan, seen, kind) for kind, _path in watch.wait(0.05)):
                if plan.delay_s:
                    time.sleep(plan.delay_s)
                break
        else:
            err = proc.communicate(timeout=60)[1]
            assert proc.returncode == 0, err
            return False, "completed before the kill", time.monotonic() - started
        elapsed = time.monotonic() - started
        os.kill(proc.pid, signal.SIGSTOP)  # stopped where it is while its files are looked at
        filling = bool(_pack_files(proc.pid, cli.repo))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    return killed, "killed while filling a pack" if killed and filling else "killed", elapsed


def _fires(plan: _Plan, seen: Counter[str], kind: str) -> bool:
    seen[kind] += 1
    return kind == plan.kind and seen[kind] == plan.occurrence


def _same_tree(restored: Path, src: Path) -> None:
    want = sorted(p.relative_to(src) for p in src.rglob("*"))
    got = sorted(p.relative_to(restored) for p in restored.rglob("*"))
    assert got == want
    files = [str(p) for p in want if (src / p).is_file()]
    _match, mismatch, errors = filecmp.cmpfiles(src, restored, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def _temp_files(repo: Path) -> dict[Path, str]:
    """Temporary files in the repository, with the kind of object each was to become."""
    kinds = (("pack", "data"), ("index", "index"), ("snapshot", "snapshots"))
    return {p: kind for kind, folder in kinds for p in (repo / folder).rglob(f"{TEMP_PREFIX}*")}


@dataclass
class _Campaign:
    cli: Cli
    src: Path
    tmp: Path
    seed: int
    hits: Counter[str]
    kills: int = 0

    def __post_init__(self) -> None:
        self.verified: set[str] = set()
        self.log: list[str] = []
        self.backup_s: list[float] = []  # incremental backups: start to snapshot, or to end

    # A timed kill counts only when the backup had not completed. A backup ends a few ms
    # after its snapshot is written (seen here: 1.01 of the time to it completes), so the
    # fractions stop at 1 of the shortest time to a snapshot.

    def _time(self, plan: _Plan) -> None:
        """Set a timed plan's delay from the shortest incremental backup seen so far."""
        if plan.kind == "time":
            plan.delay_s = plan.fraction * min(self.backup_s)

    def round(self, n: int, plan: _Plan, watch: _TempWatch, new_bytes: int) -> None:
        """Kill one backup as planned, then check the repository and back up again."""
        repo = self.cli.repo
        where = f"seed {self.seed}, round {n}"
        packs_before, temps_before = _files(repo, "data"), _temp_files(repo)
        self._time(plan)
        killed, what, elapsed = _kill_backup(self.cli, self.src, watch, plan)
        if n and (plan.kind == "snapshot" or not killed):
            self.backup_s.append(elapsed)
        self.kills += killed
        # Temp files stay where the kill left them: check and backups must cope with them.
        left = {p: k for p, k in _temp_files(repo).items() if p not in temps_before}
        self.hits.update(left.values())
        self.hits.update(["pack"] if what == "killed while filling a pack" else [])
        landed = sum(s for p, s in _files(repo, "data").items() if p not in packs_before)
        self.log.append(
            f"round {n}: kill at {plan}: {what}; temp files left (kind, bytes): "
            f"{[(k, p.stat().st_size) for p, k in left.items()]}, {landed} bytes of packs landed"
        )
        where += f"\n{self.log[-1]}"
        _after_kill(self.cli, self.src, self.tmp / f"r{n}", self.verified, where)
        summary = self.cli("backup", "files", self.src, "--json")
        assert summary.code == 0, f"{where}: next backup failed: {summary.err}"
        added = int(summary.json_lines()[-1]["bytes_added_stored"])
        if n or landed:  # an incremental backup, or packs of the first one landed
            assert added < FILES * FILE_BYTES, f"{where}: next backup stored {added} bytes"
        # What had landed is not stored again (slack: trees, headers, encryption overhead).
        assert added <= max(0, new_bytes - landed) + (256 << 10) + new_bytes // 50, (
            f"{where}: next backup stored {added} bytes of {new_bytes} new, although "
            f"{landed} bytes of packs had landed"
        )
        _after_kill(self.cli, self.src, self.tmp / f"n{n}", self.verified, where)


def test_sigkill_campaign(cli: Cli, tmp_path: Path, crash_base_tree: Path) -> None:
    seed = int(os.environ.get("STRATAVAULT_CRASH_SEED") or random.randrange(1 << 32))
    rng, gen = random.Random(seed), np.random.default_rng(seed)
    src = tmp_path / "src"
    _copy_tree(crash_base_tree, src)
    assert cli("init").code == 0
    campaign = _Campaign(cli, src, tmp_path, seed, Counter())
    watch = _TempWatch(cli.repo)
    try:
        for n, plan in enumerate(_plans(rng)):
            new_bytes = _change_tree(src, rng, gen) if n else FILES * FILE_BYTES
            try:
                campaign.round(n, plan, watch, new_bytes)
            except AssertionError as exc:  # every failure names the seed that replays it
                replay = f"STRATAVAULT_CRASH_SEED={seed} replays this campaign"
                raise AssertionError(f"{replay}; round {n}, kill at {plan}: {exc}") from exc
    finally:
        watch.close()
    report = f"seed {seed}: {campaign.kills} kills, hits {dict(campaign.hits)}\n" + "\n".join(
        campaign.log
    )
    print(report)
    assert campaign.kills >= MIN_KILLS, report
    for kind in KINDS:
        assert campaign.hits[kind] >= 1, f"no kill landed while a {kind} was written; {report}"


def _after_kill(cli: Cli, src: Path, target: Path, verified: set[str], where: str) -> None:
    """check --read-data passes; snapshots not seen before restore to the source's content."""
    check = cli("check", "--read-data")
    assert check.code == 0, f"{where}: check failed:\n{check.out}{check.err}"
    snapshots = cli("snapshots", "--json").json()
    assert isinstance(snapshots, list)
    for snap in snapshots:
        sid = str(snap["id"])
        if sid in verified:
            continue
        restore = cli("restore", sid, "--target", target)
        assert restore.code == 0, f"{where}: restore {sid[:8]} failed: {restore.err}"
        _same_tree(target / src.relative_to("/"), src)
        shutil.rmtree(target)
        verified.add(sid)
