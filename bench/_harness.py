"""Benchmark harness shared by bench/files.py and later benchmarks (disks, VMs).

Runs several backup tools over the same data in one run, phase by phase (every tool does
phase 1, then every tool does phase 2...), so that all tools see the same source state.
Each timed command runs under GNU time, after dropping the page cache when the process is
allowed to (root); its peak memory is the larger of GNU time's maximum RSS and the PSS summed
over its process tree (worker processes included); the repository size is measured after
every phase.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

GNU_TIME = "/usr/bin/time"
PASSWORD = "stratavault-bench-passphrase"
BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent


class BenchError(Exception):
    """A tool command failed or a result did not check out."""


@dataclass
class Tool:
    """A backup program driven through its command line, with its repository under `home`."""

    name: str
    home: Path = field(default=Path("."))
    note: str = ""

    @property
    def repo(self) -> Path:
        return self.home / "repo"

    def available(self) -> str | None:
        """None when the tool can run here, else why not."""
        return None

    def env(self) -> dict[str, str]:
        """Environment for every command: own cache and config folders, passphrase."""
        password_file = self.home / "password"
        if not password_file.exists():
            password_file.write_text(PASSWORD + "\n")
            password_file.chmod(0o600)
        env = dict(os.environ)
        env["XDG_CACHE_HOME"] = str(self.home / "cache")
        env["XDG_CONFIG_HOME"] = str(self.home / "config")
        return env

    def init_cmd(self) -> list[str]:
        raise NotImplementedError

    def backup_cmd(self, sources: Sequence[Path], number: int) -> list[str]:
        raise NotImplementedError

    def restore_cmd(self, target: Path, number: int) -> list[str]:
        """Restore backup `number` (1-based) into target."""
        raise NotImplementedError

    def restored_root(self, target: Path, source: Path) -> Path:
        """Where `source` landed inside a restore target."""
        for candidate in (target / str(source).lstrip("/"), target / source.name):
            if candidate.is_dir():
                return candidate
        return target


@dataclass
class StratavaultTool(Tool):
    """The project's own CLI (`stratavault`), installed in the venv next to this Python."""

    backup_kind: str = "files"

    def executable(self) -> str:
        return str(Path(sys.executable).parent / "stratavault")

    def available(self) -> str | None:
        return None if Path(self.executable()).exists() else f"{self.executable()} missing"

    def env(self) -> dict[str, str]:
        env = super().env()
        env["STRATAVAULT_REPOSITORY"] = str(self.repo)
        env["STRATAVAULT_PASSWORD_FILE"] = str(self.home / "password")
        return env

    def init_cmd(self) -> list[str]:
        return [self.executable(), "init"]

    def backup_cmd(self, sources: Sequence[Path], number: int) -> list[str]:
        paths = [str(s) for s in sources]
        return [self.executable(), "backup", self.backup_kind, *paths, "--host", "bench", "--quiet"]

    def restore_cmd(self, target: Path, number: int) -> list[str]:
        return [self.executable(), "restore", "latest", "--target", str(target)]


@dataclass
class ResticTool(Tool):
    """restic (Debian's build): repository format 2, zstd compression 'auto'."""

    def available(self) -> str | None:
        return None if shutil.which("restic") else "restic not on PATH"

    def env(self) -> dict[str, str]:
        env = super().env()
        env["RESTIC_REPOSITORY"] = str(self.repo)
        env["RESTIC_PASSWORD_FILE"] = str(self.home / "password")
        return env

    def init_cmd(self) -> list[str]:
        return ["restic", "init"]

    def backup_cmd(self, sources: Sequence[Path], number: int) -> list[str]:
        return ["restic", "backup", "--host", "bench", *[str(s) for s in sources]]

    def restore_cmd(self, target: Path, number: int) -> list[str]:
        return ["restic", "restore", "latest", "--target", str(target)]


@dataclass
class BorgTool(Tool):
    """BorgBackup 1.2 with repokey-blake2 encryption and the given compression."""

    compression: str = "lz4"

    def available(self) -> str | None:
        return None if shutil.which("borg") else "borg not on PATH"

    def env(self) -> dict[str, str]:
        env = super().env()
        env["BORG_PASSCOMMAND"] = "cat " + shlex.quote(str(self.home / "password"))
        env["BORG_BASE_DIR"] = str(self.home / "borg-base")
        return env

    def init_cmd(self) -> list[str]:
        return ["borg", "init", "--encryption", "repokey-blake2", str(self.repo)]

    def backup_cmd(self, sources: Sequence[Path], number: int) -> list[str]:
        archive = f"{self.repo}::backup-{number}"
        return ["borg", "create", "--compression", self.compression, archive, *map(str, sources)]

    def restore_cmd(self, target: Path, number: int) -> list[str]:
        return ["borg", "extract", f"{self.repo}::backup-{number}"]


def make_tool(name: str, home: Path, backup_kind: str = "files") -> Tool:
    """A tool by name: stratavault, restic, borg (lz4) or borg-zstd (zstd level 3)."""
    if name == "stratavault":
        return StratavaultTool(name, home, backup_kind=backup_kind)
    if name == "restic":
        return ResticTool(name, home, note="zstd auto, repository v2")
    if name == "borg":
        return BorgTool(name, home, note="repokey-blake2, lz4 (default)", compression="lz4")
    if name == "borg-zstd":
        return BorgTool(name, home, note="repokey-blake2, zstd,3", compression="zstd,3")
    raise BenchError(f"unknown tool {name!r} (stratavault, restic, borg, borg-zstd)")


@dataclass
class Phase:
    """One step every tool performs: a backup (number n) or a restore of the latest backup."""

    name: str
    kind: str  # "backup" or "restore"
    prepare: Callable[[], str] | None = None  # runs once before the phase; returns a summary


@dataclass
class Measurement:
    """What one tool did in one phase."""

    tool: str
    phase: str
    seconds: float
    peak_rss_kib: int
    repo_bytes: int
    check: str = ""


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False when not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def du_bytes(path: Path) -> int:
    """Disk usage of a tree in bytes (du -sb: apparent sizes)."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _pss_kib(pid: int) -> int:
    """Proportional set size of a process (shared pages split among their users), KiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_memory_kib(root: int) -> int:
    """Memory of a process and all its descendants now: the sum of their PSS (KiB).

    PSS counts a page shared by several processes (libraries, copy-on-write) once in all,
    so worker processes add what they really cost.
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields.get("PPid", "0").strip() or 0)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _pss_kib(pid)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


def run_measured(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[float, int]:
    """Run a command under GNU time; (wall seconds, peak RSS KiB). Output goes to `log`.

    The peak is the larger of GNU time's maximum RSS (the biggest single process) and the
    PSS summed over the command's whole process tree, sampled every 200 ms, so that worker
    processes count too.
    """
    rss_file = log.with_suffix(".rss")
    full = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd]
    tree_peak = 0
    ended: list[float] = []
    with open(log, "wb") as out:
        out.write((" ".join(cmd) + "\n").encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(full, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        # The end is taken when waitpid returns (in a thread), not at the next memory
        # sample: sampling every 0.2 s would round every run up to the next 0.2 s.
        waiter = threading.Thread(target=lambda: ended.append(_wait(proc)), daemon=True)
        waiter.start()
        while waiter.is_alive():
            tree_peak = max(tree_peak, _tree_memory_kib(proc.pid))
            waiter.join(0.2)
        seconds = ended[0] - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise BenchError(f"{cmd[0]} failed (exit {proc.returncode}): " + "\n".join(tail))
    rss_lines = rss_file.read_text().split()
    return seconds, max(tree_peak, int(rss_lines[-1]) if rss_lines else 0)


def _wait(proc: subprocess.Popen[bytes]) -> float:
    """Wait for ``proc`` to end; the ``perf_counter`` time it ended at."""
    proc.wait()
    return time.perf_counter()


@dataclass
class Benchmark:
    """One run: tools, phases over the same sources, a work folder, and the results."""

    tools: list[Tool]
    phases: list[Phase]
    sources: list[Path]
    workdir: Path
    check_restore: Callable[[Tool, Path], str] | None = None
    drop_cache: bool = True
    measurements: list[Measurement] = field(default_factory=list)
    cache_dropped: bool = False
    log: Callable[[str], None] = print

    def run(self) -> list[Measurement]:
        """Init every tool's repository, then run each phase for every tool in turn."""
        for tool in self.tools:
            if tool.home.exists():
                shutil.rmtree(tool.home)
            tool.home.mkdir(parents=True)
            run_measured(tool.init_cmd(), tool.env(), tool.home, tool.home / "init.log")
            self.log(f"  {tool.name}: repository initialised")
        backups = 0
        for phase in self.phases:
            if phase.prepare is not None:
                self.log(f"  {phase.name}: {phase.prepare()}")
            backups += phase.kind == "backup"
            for tool in self.tools:
                self.measurements.append(self._run_phase(tool, phase, backups))
                m = self.measurements[-1]
                self.log(
                    f"  {phase.name:<10} {tool.name:<12} {m.seconds:8.2f} s "
                    f"{m.peak_rss_kib / 1024:8.1f} MiB RSS {m.check}"
                )
        return self.measurements

    def _run_phase(self, tool: Tool, phase: Phase, backups: int) -> Measurement:
        env = tool.env()
        log = tool.home / f"{phase.name}.log"
        if self.drop_cache:
            self.cache_dropped = drop_caches()
        check = ""
        if phase.kind == "backup":
            seconds, rss = run_measured(tool.backup_cmd(self.sources, backups), env, tool.home, log)
        elif phase.kind == "restore":
            target = self.workdir / "restore" / tool.name
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            cmd = tool.restore_cmd(target, backups)
            seconds, rss = run_measured(cmd, env, target, log)
            if self.check_restore is not None:
                check = self.check_restore(tool, target)
            shutil.rmtree(target)
        else:
            raise BenchError(f"unknown phase kind {phase.kind!r}")
        return Measurement(tool.name, phase.name, seconds, rss, du_bytes(tool.repo), check)


def ratio_table(measurements: list[Measurement], baseline: str) -> dict[str, dict[str, float]]:
    """{phase: {tool: tool's seconds / baseline's seconds}} for every other tool."""
    by_key = {(m.tool, m.phase): m for m in measurements}
    ratios: dict[str, dict[str, float]] = {}
    for m in measurements:
        base = by_key.get((baseline, m.phase))
        if base is None or m.tool == baseline or base.seconds <= 0:
            continue
        ratios.setdefault(m.phase, {})[m.tool] = m.seconds / base.seconds
    return ratios


def format_results(measurements: list[Measurement], baseline: str) -> str:
    """A plain-text table of every measurement plus time ratios against the baseline tool."""
    lines = [f"{'phase':<10} {'tool':<12} {'seconds':>9} {'peak RSS MiB':>13} {'repo MiB':>10}"]
    for m in measurements:
        lines.append(
            f"{m.phase:<10} {m.tool:<12} {m.seconds:9.2f} {m.peak_rss_kib / 1024:13.1f} "
            f"{m.repo_bytes / 2**20:10.1f}"
        )
    ratios = ratio_table(measurements, baseline)
    if ratios:
        lines.append("")
        lines.append(f"time ratios (tool / {baseline}; > 1 means {baseline} is faster):")
        for phase, per_tool in ratios.items():
            cells = "  ".join(f"{tool} {value:.2f}x" for tool, value in per_tool.items())
            lines.append(f"  {phase:<10} {cells}")
    return "\n".join(lines)


def machine_info() -> dict[str, object]:
    """Where the numbers were taken."""
    versions = {}
    for cmd in (["restic", "version"], ["borg", "--version"]):
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            versions[cmd[0]] = out.stdout.strip()
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_results(name: str, bench: Benchmark, extra: dict[str, object], baseline: str) -> Path:
    """Write bench/results/<name>.json and return its path."""
    out_dir = BENCH_DIR / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{name}.json"
    doc = {
        "name": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "page_cache_dropped": bench.cache_dropped,
        "tools": {t.name: t.note for t in bench.tools},
        "measurements": [asdict(m) for m in bench.measurements],
        "ratios_vs_" + baseline: ratio_table(bench.measurements, baseline),
        **extra,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def compile_package(src: str) -> None:
    """Write the bytecode of the stratavault package that the benchmark runs, as an
    installation does: with PYTHONDONTWRITEBYTECODE set (as on these machines) every
    command would otherwise compile all its modules again."""
    if src:
        folder = Path(src) / "stratavault"
    else:
        import stratavault

        folder = Path(stratavault.__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(folder)], check=True)
