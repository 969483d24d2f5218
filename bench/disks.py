"""Disk-image benchmark: stratavault against restic and borg on the same 2 GiB ext4 image.

    .venv/bin/python bench/disks.py [--runs 1] [--workdir DIR] [--tools stratavault,restic,borg]
                                    [--src SRC] [--chunk-kib N] [--name disks]

``--src`` runs stratavault from another source folder (e.g. ``git archive HEAD src`` unpacked,
while other engineers' half-done edits are in the working tree); its bytecode is compiled
first, as an installation does (PYTHONDONTWRITEBYTECODE is set on these machines, so every
command would otherwise compile all its modules). ``--chunk-kib`` sets stratavault's disk
chunk size. Results go to bench/results/NAME.json.

Dataset (built once, cached in WORKDIR/disk-dataset-vN): a 2 GiB raw image holding a real
ext4 file system (``mke2fs -d``) filled with ~1.3 GiB of files copied from /usr, and a
deterministic change: ~31 MiB in 64 KiB blocks at 64 KiB-aligned places (most inside
data, some in free space), half text, half random bytes, as in reference/facts.md.

Each run, with fresh repositories:
1. full: every tool backs up ``disk.raw`` (a copy of the base image).
2. stratavault also backs up ``disk.qcow2``, an overlay on the base image with no data of
   its own: same data, read through qemu-storage-daemon, stores nothing new, and starts
   the qcow2's persistent bitmap chain (timed as ``full-qcow2``).
3. The change is written into ``disk.qcow2`` with qemu-io (its bitmap records it) and the
   same bytes into ``disk.raw`` (checked equal with ``qemu-img compare``).
4. incremental: stratavault backs up ``disk.qcow2`` (only the bitmap's extents are read);
   restic and borg back up the changed ``disk.raw`` again.
5. restore: each tool restores the latest backup to a new file (checked with cmp).
6. changed-only: stratavault restores the latest snapshot ``--onto`` a copy of the base
   image ``--changed-only`` (checked with cmp against the changed image); changed-only-bitmap
   restores it onto the qcow2 with the change reverted, whose bitmap marks what to write.
6a. The full restore and both changed-only restores again through a host agent
   (``stratavault agent``, which has run one command before: the passphrase's key
   derivation is remembered, as in an agent in use), then new bytes into the same 496
   blocks of the qcow2 and a bitmap incremental through it: ``*-agent`` rows.
7. sparse-64g: stratavault backs up (fresh repository) a 64 GiB sparse raw image holding the
   base image at its start and 24 MiB elsewhere; its peak memory is compared with the full
   backup of the 2 GiB image.
The page cache is dropped before every timed command. Each target is a ratio computed within
each run (the tools of one run share the machine's load), judged on the median over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    BENCH_DIR,
    BenchError,
    Benchmark,
    Measurement,
    Phase,
    StratavaultTool,
    Tool,
    compile_package,
    drop_caches,
    du_bytes,
    machine_info,
    make_tool,
    run_measured,
)
from files import build_dataset, generated_bytes

DATASET_VERSION = 1
IMAGE_BYTES = 2 << 30
SPARSE_BYTES = 64 << 30
FILES_BYTES = int(1.3 * 2**30)
BLOCK = 64 << 10
CHANGED_BLOCKS = 496  # 31 MiB
SV = "stratavault"
DESCRIPTION = "Disk-image benchmark: stratavault against restic and borg on one ext4 image."


@dataclass
class Dataset:
    """The cached base image and the change to apply to it."""

    home: Path
    info: dict[str, Any]

    @property
    def base(self) -> Path:
        return self.home / "base.raw"

    @property
    def offsets(self) -> list[int]:
        return [int(o) for o in self.info["changed_offsets"]]

    def block(self, number: int) -> Path:
        return self.home / "changes" / f"{number:04d}.bin"


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The data regions of a sparse file (SEEK_DATA / SEEK_HOLE)."""
    out, pos = [], 0
    with open(path, "rb") as fh:
        fd, size = fh.fileno(), os.fstat(fh.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    return out


def pick_offsets(extents: list[tuple[int, int]], rng: random.Random) -> list[int]:
    """CHANGED_BLOCKS distinct 64 KiB-aligned offsets: 85 % inside data, the rest anywhere."""
    blocks = sorted({b for o, n in extents for b in range(o // BLOCK, -(-(o + n) // BLOCK))})
    chosen: set[int] = set()
    while len(chosen) < CHANGED_BLOCKS:
        if len(chosen) < CHANGED_BLOCKS * 85 // 100:
            chosen.add(rng.choice(blocks))
        else:
            chosen.add(rng.randrange(IMAGE_BYTES // BLOCK))
    return sorted(b * BLOCK for b in chosen)


def build_image(home: Path) -> dict[str, object]:
    """Copy files from /usr into a tree, make the ext4 image from it, drop the tree."""
    tree = home / "tree"
    files = build_dataset(tree, 0, FILES_BYTES, Path("/usr"))
    image = home / "base.raw"
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", str(tree)]
    subprocess.run([*cmd, str(image), str(IMAGE_BYTES >> 10)], check=True)
    shutil.rmtree(tree)
    extents = data_extents(image)
    rng = random.Random(4)
    offsets = pick_offsets(extents, rng)
    (home / "changes").mkdir()
    for i, _offset in enumerate(offsets):
        (home / "changes" / f"{i:04d}.bin").write_bytes(generated_bytes(rng, BLOCK))
    return {
        "files": files["files"],
        "file_bytes": files["bytes"],
        "image_bytes": IMAGE_BYTES,
        "image_data_bytes": sum(n for _o, n in extents),
        "changed_bytes": len(offsets) * BLOCK,
        "changed_offsets": offsets,
    }


def dataset(workdir: Path) -> Dataset:
    """The cached dataset (built on first use, ~1 minute)."""
    home = workdir / f"disk-dataset-v{DATASET_VERSION}"
    manifest = home / "manifest.json"
    if manifest.exists():
        return Dataset(home, json.loads(manifest.read_text()))
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    print(f"building the disk dataset in {home} (once; cached)")
    start = time.perf_counter()
    info = build_image(home)
    manifest.write_text(json.dumps(info) + "\n")
    print(f"  built in {time.perf_counter() - start:.0f} s")
    return Dataset(home, info)


def apply_change(ds: Dataset, qcow2: Path, raw: Path) -> str:
    """Write the change into the qcow2 (through QEMU: its bitmap records it) and the raw."""
    cmd = ["qemu-io", "-f", "qcow2", str(qcow2)]
    for i, offset in enumerate(ds.offsets):
        cmd += ["-c", f"write -q -s {ds.block(i)} {offset} {BLOCK}"]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(raw, "r+b") as fh:
        for i, offset in enumerate(ds.offsets):
            os.pwrite(fh.fileno(), ds.block(i).read_bytes(), offset)
    same = subprocess.run(["qemu-img", "compare", str(qcow2), str(raw)], capture_output=True)
    if same.returncode != 0:
        raise BenchError(f"qcow2 and raw differ after the change: {same.stdout!r}")
    return f"{len(ds.offsets)} blocks of 64 KiB changed ({len(ds.offsets) * BLOCK >> 20} MiB)"


@dataclass
class ImageStratavault(StratavaultTool):
    """stratavault backing up disk images: backup ``n`` may use its own image path."""

    images: dict[int, Path] = field(default_factory=dict)
    src: str = ""
    """A source tree to run instead of the installed one (PYTHONPATH), e.g. an export of
    a commit while the working tree is half edited."""
    chunk_kib: int = 0
    """--chunk-size of new disks (0: the default)."""

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.src:
            env["PYTHONPATH"] = self.src
        return env

    def backup_cmd(self, sources: Sequence[Path], number: int) -> list[str]:
        paths = [self.images[number]] if number in self.images else list(sources)
        cmd = [self.executable(), "backup", "image", *map(str, paths), "--host", "bench"]
        chunk = ["--chunk-size", str(self.chunk_kib)] if self.chunk_kib else []
        # The overlay names its backing file: the format must be given (see docs/cli.md).
        qcow2 = ["--format", "qcow2"] if all(str(p).endswith(".qcow2") for p in paths) else []
        return [*cmd, *chunk, *qcow2, "--name", "disk.raw", "--json"]

    def restore_cmd(self, target: Path, number: int) -> list[str]:
        to = str(target / "disk.raw")
        return [self.executable(), "restore", "disk", "latest", "--to", to, "--quiet"]


def restored_file(tool: Tool, target: Path, source: Path) -> Path:
    """Where a tool put the restored image inside ``target``."""
    for candidate in (target / str(source).lstrip("/"), target / source.name):
        if candidate.is_file():
            return candidate
    raise BenchError(f"{tool.name}: no restored image under {target}")


def same_file(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def timed(tool: Tool, cmd: list[str], log_name: str) -> tuple[float, int]:
    """Drop the page cache, then run and measure one command of ``tool``."""
    drop_caches()
    return run_measured(cmd, tool.env(), tool.home, tool.home / f"{log_name}.log")


def last_json(log: Path) -> dict[str, object]:
    """The last JSON object line a ``--json`` command printed."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise BenchError(f"no JSON summary in {log}")


@dataclass
class RunContext:
    """The files and tools of one run."""

    ds: Dataset
    work: Path
    tools: list[Tool]
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def raw(self) -> Path:
        return self.work / "disk.raw"

    @property
    def qcow2(self) -> Path:
        return self.work / "disk.qcow2"

    def stratavault(self) -> ImageStratavault | None:
        found = [t for t in self.tools if isinstance(t, ImageStratavault)]
        return found[0] if found else None


def prepare_images(ctx: RunContext) -> str:
    """disk.raw: a sparse copy of the base; disk.qcow2: an empty overlay on the base."""
    shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True)
    subprocess.run(["cp", "--sparse=always", str(ctx.ds.base), str(ctx.raw)], check=True)
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(ctx.ds.base)]
    subprocess.run([*create, str(ctx.qcow2)], check=True)
    return f"copied the base image to {ctx.raw}, overlay {ctx.qcow2}"


def chain_start(ctx: RunContext) -> str:
    """stratavault's first backup of the qcow2 (timed as full-qcow2), then the change."""
    sv = ctx.stratavault()
    if sv is not None:
        cmd = sv.backup_cmd([ctx.qcow2], 0)
        cmd[cmd.index("image") + 1] = str(ctx.qcow2)
        seconds, rss = timed(sv, cmd, "full-qcow2")
        summary = last_json(sv.home / "full-qcow2.log")
        ctx.notes["full_qcow2_read"] = summary["bytes_read"]
        ctx.notes["measurements"] = [
            Measurement(sv.name, "full-qcow2", seconds, rss, du_bytes(sv.repo), "chain started")
        ]
        print(f"  full-qcow2 {sv.name:<12} {seconds:8.2f} s {rss / 1024:8.1f} MiB RSS")
    return apply_change(ctx.ds, ctx.qcow2, ctx.raw)


def check_restore(ctx: RunContext, tool: Tool, target: Path) -> str:
    got = restored_file(tool, target, ctx.raw)
    if not same_file(got, ctx.raw):
        raise BenchError(f"{tool.name}: the restored image differs from {ctx.raw}")
    return "restore ok (cmp)"


def changed_only(ctx: RunContext, sv: ImageStratavault, phase: str = "changed-only") -> Measurement:
    """Restore the latest snapshot onto a copy of the base image, writing what differs."""
    onto = ctx.work / "onto.raw"
    subprocess.run(["cp", "--sparse=always", str(ctx.ds.base), str(onto)], check=True)
    cmd = [sv.executable(), "restore", "disk", "latest", "--onto", str(onto), "--changed-only"]
    seconds, rss = timed(sv, cmd, phase)
    if not same_file(onto, ctx.raw):
        raise BenchError(f"{phase} restore: the result differs from the changed image")
    report = (sv.home / f"{phase}.log").read_text().splitlines()[-1]
    onto.unlink()
    return Measurement(sv.name, phase, seconds, rss, du_bytes(sv.repo), report.strip())


def revert_change(ctx: RunContext) -> None:
    """Write the base image's bytes back into the changed blocks of the qcow2 (through
    QEMU: the bitmap of the latest backup records them), so it holds the base again."""
    folder = ctx.work / "revert"
    folder.mkdir()
    cmd = ["qemu-io", "-f", "qcow2", str(ctx.qcow2)]
    with open(ctx.ds.base, "rb") as base:
        for i, offset in enumerate(ctx.ds.offsets):
            block = folder / f"{i:04d}.bin"
            block.write_bytes(os.pread(base.fileno(), BLOCK, offset))
            cmd += ["-c", f"write -q -s {block} {offset} {BLOCK}"]
    subprocess.run(cmd, check=True, capture_output=True)
    shutil.rmtree(folder)
    compare = ["qemu-img", "compare", str(ctx.qcow2), str(ctx.ds.base)]
    same = subprocess.run(compare, capture_output=True)
    if same.returncode != 0:
        raise BenchError("reverting the change in the qcow2 did not give the base image")


def changed_only_bitmap(
    ctx: RunContext, sv: ImageStratavault, phase: str = "changed-only-bitmap"
) -> Measurement:
    """The same delta restored onto the qcow2 that has the latest snapshot's bitmap: only
    what the bitmap marks is written, nothing is compared."""
    revert_change(ctx)
    cmd = [sv.executable(), "restore", "disk", "latest", "--onto", str(ctx.qcow2)]
    seconds, rss = timed(sv, [*cmd, "--changed-only"], phase)
    same = subprocess.run(
        ["qemu-img", "compare", str(ctx.qcow2), str(ctx.raw)], capture_output=True
    )
    if same.returncode != 0:
        raise BenchError(f"{phase} restore with the bitmap: the result differs")
    report = (sv.home / f"{phase}.log").read_text().strip().splitlines()
    return Measurement(sv.name, phase, seconds, rss, du_bytes(sv.repo), " / ".join(report[-2:]))


@dataclass
class AgentStratavault(ImageStratavault):
    """The same stratavault, its commands run by a host agent (``stratavault agent``)."""

    socket: Path = Path("agent.sock")

    def env(self) -> dict[str, str]:
        env = super().env()
        env["STRATAVAULT_AGENT"] = str(self.socket)
        return env

    def executable(self) -> str:
        """A script that runs stratavault without a controlling terminal (the agent serves
        no command from a terminal), should the benchmark be started from one."""
        script = self.socket.parent / "stratavault-detached"
        if not script.exists():
            real = super().executable()
            script.write_text(f'#!/bin/sh\nexec setsid -w {real} "$@" < /dev/null\n')
            script.chmod(0o755)
        return str(script)


@contextmanager
def host_agent(sv: ImageStratavault) -> Iterator[AgentStratavault]:
    """A host agent for ``sv``'s repository that has run one command already (as an agent
    in use has: the passphrase's key derivation is remembered)."""
    folder = sv.home / "agent"
    folder.mkdir(mode=0o700, exist_ok=True)
    via = AgentStratavault(
        sv.name, sv.home, images=sv.images, src=sv.src, chunk_kib=sv.chunk_kib,
        socket=folder / "agent.sock",
    )  # fmt: skip
    with open(sv.home / "agent.log", "wb") as log:
        agent = subprocess.Popen(
            [sv.executable(), "agent", "--socket", str(via.socket)],
            env=sv.env(), stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
    try:
        assert agent.stdout is not None
        if not agent.stdout.readline().startswith(b"agent listening"):
            raise BenchError(f"the agent did not start: see {sv.home / 'agent.log'}")
        run_measured([via.executable(), "snapshots"], via.env(), sv.home, sv.home / "warm.log")
        yield via
        served = (sv.home / "agent.log").read_text().count(" in process ")
        if served < 4:
            raise BenchError(f"the agent ran {served} of the 4 commands: see agent.log")
    finally:
        agent.terminate()
        agent.wait(30)


def second_change(ctx: RunContext) -> None:
    """New bytes of the same kind in the same blocks of the qcow2 (through QEMU: its
    bitmap records them), for a second bitmap incremental with as much new data."""
    folder = ctx.work / "second"
    folder.mkdir()
    rng = random.Random(2)
    cmd = ["qemu-io", "-f", "qcow2", str(ctx.qcow2)]
    for i, offset in enumerate(ctx.ds.offsets):
        block = folder / f"{i:04d}.bin"
        block.write_bytes(generated_bytes(rng, BLOCK))
        cmd += ["-c", f"write -q -s {block} {offset} {BLOCK}"]
    subprocess.run(cmd, check=True, capture_output=True)
    shutil.rmtree(folder)


def through_agent(ctx: RunContext, sv: ImageStratavault) -> list[Measurement]:
    """The full restore, both changed-only restores and (after a second change of the
    same size) a bitmap incremental again, run by a host agent (peak RSS is the client's
    only: the command runs in the agent's process)."""
    with host_agent(sv) as via:
        target = ctx.work / "restore-agent"
        target.mkdir()
        seconds, rss = timed(via, via.restore_cmd(target, 1), "restore-agent")
        check_restore(ctx, via, target)
        shutil.rmtree(target)
        full = Measurement(sv.name, "restore-agent", seconds, rss, du_bytes(sv.repo), "cmp ok")
        rows = [
            full,
            changed_only(ctx, via, "changed-only-agent"),
            changed_only_bitmap(ctx, via, "changed-only-bitmap-agent"),
        ]
        second_change(ctx)
        seconds, rss = timed(via, via.backup_cmd([ctx.qcow2], 2), "incremental-agent")
        done = last_json(sv.home / "incremental-agent.log")
        check = f"read {done['bytes_read']} bytes, stored {done['bytes_added_stored']}"
        rows.append(
            Measurement(sv.name, "incremental-agent", seconds, rss, du_bytes(sv.repo), check)
        )
        return rows


def sparse_64g(ctx: RunContext, sv: ImageStratavault) -> Measurement:
    """Back up a 64 GiB sparse image (the base at its start, 24 MiB elsewhere), fresh repo."""
    image = ctx.work / "sparse64.raw"
    subprocess.run(["cp", "--sparse=always", str(ctx.ds.base), str(image)], check=True)
    rng = random.Random(64)
    with open(image, "r+b") as fh:
        fh.truncate(SPARSE_BYTES)
        for offset in (20 << 30, 40 << 30, SPARSE_BYTES - (8 << 20)):
            os.pwrite(fh.fileno(), generated_bytes(rng, 8 << 20), offset)
    home = sv.home.parent / "stratavault-64g"
    big = ImageStratavault(sv.name, home, src=sv.src, chunk_kib=sv.chunk_kib)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    run_measured(big.init_cmd(), big.env(), home, home / "init.log")
    seconds, rss = timed(big, big.backup_cmd([image], 1), "sparse-64g")
    read = last_json(home / "sparse-64g.log")["bytes_read"]
    image.unlink()
    size = du_bytes(big.repo)
    shutil.rmtree(home)
    return Measurement(sv.name, "sparse-64g", seconds, rss, size, f"read {read} bytes")


def make_tools(names: list[str], home: Path, images: dict[int, Path], args: Any) -> list[Tool]:
    tools: list[Tool] = []
    for name in names:
        if name == "stratavault":
            sv = ImageStratavault(name, home / name, images=images, src=args.src)
            sv.chunk_kib = args.chunk_kib
            tools.append(sv)
        else:
            tools.append(make_tool(name, home / name))
    return tools


def one_run(
    ds: Dataset, workdir: Path, names: list[str], number: int, args: Any
) -> list[Measurement]:
    """Every phase for every tool, fresh repositories; the measurements."""
    work = workdir / "disk-run"
    tools = make_tools(names, workdir / "disk-tools", {2: work / "disk.qcow2"}, args)
    ctx = RunContext(ds, work, tools)
    phases = [
        Phase("full", "backup", prepare=lambda: prepare_images(ctx)),
        Phase("incremental", "backup", prepare=lambda: chain_start(ctx)),
        Phase("restore", "restore"),
    ]
    print(f"run {number}:")
    bench = Benchmark(
        tools, phases, [ctx.raw], workdir, lambda t, p: check_restore(ctx, t, p), log=print
    )
    bench.run()
    out = list(bench.measurements)
    out += ctx.notes.get("measurements", [])  # type: ignore[arg-type]
    sv = ctx.stratavault()
    if sv is not None:
        inc = last_json(sv.home / "incremental.log")
        for m in out:
            if m.tool == sv.name and m.phase == "incremental":
                m.check = f"read {inc['bytes_read']} bytes (bitmap {inc['disks'][0]['bitmap']})"  # type: ignore[index]
        extras = (
            changed_only(ctx, sv), changed_only_bitmap(ctx, sv), *through_agent(ctx, sv),
            sparse_64g(ctx, sv),
        )  # fmt: skip
        for extra in extras:
            print(
                f"  {extra.phase:<11} {sv.name:<12} {extra.seconds:8.2f} s "
                f"{extra.peak_rss_kib / 1024:8.1f} MiB RSS {extra.check}"
            )
            out.append(extra)
    shutil.rmtree(work, ignore_errors=True)
    return out


def summarise(runs: list[list[Measurement]]) -> dict[str, dict[str, dict[str, float]]]:
    """{phase: {tool: {seconds, min, max, peak_rss_mib, repo_mib}}}: medians and spread."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for run in runs:
        for m in run:
            groups.setdefault((m.phase, m.tool), []).append(m)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (phase, tool), ms in groups.items():
        secs = [m.seconds for m in ms]
        out.setdefault(phase, {})[tool] = {
            "seconds": round(statistics.median(secs), 2),
            "min": round(min(secs), 2),
            "max": round(max(secs), 2),
            "peak_rss_mib": round(statistics.median(m.peak_rss_kib for m in ms) / 1024, 1),
            "repo_mib": round(statistics.median(m.repo_bytes for m in ms) / 2**20, 1),
        }
    return out


RATIOS = (
    # (name, goal, numerator (phase, tool, field), denominator): ratio >= goal is met
    ("full backup >= 2x restic", 2.0, ("full", "restic", "seconds"), ("full", SV, "seconds")),
    ("repository <= restic's after the full backup", 1.0,
     ("full", "restic", "repo_bytes"), ("full", SV, "repo_bytes")),
    ("bitmap incremental >= 10x restic's second backup", 10.0,
     ("incremental", "restic", "seconds"), ("incremental", SV, "seconds")),
    ("full restore >= restic's speed", 1.0,
     ("restore", "restic", "seconds"), ("restore", SV, "seconds")),
    ("changed-only restore (compare) >= 5x own full restore", 5.0,
     ("restore", SV, "seconds"), ("changed-only", SV, "seconds")),
    ("changed-only restore (qcow2 bitmap) >= 5x own full restore", 5.0,
     ("restore", SV, "seconds"), ("changed-only-bitmap", SV, "seconds")),
    ("through the host agent: bitmap incremental >= 10x restic's second backup", 10.0,
     ("incremental", "restic", "seconds"), ("incremental-agent", SV, "seconds")),
    ("through the host agent: changed-only (compare) >= 5x full restore", 5.0,
     ("restore-agent", SV, "seconds"), ("changed-only-agent", SV, "seconds")),
    ("through the host agent: changed-only (qcow2 bitmap) >= 5x full restore", 5.0,
     ("restore-agent", SV, "seconds"), ("changed-only-bitmap-agent", SV, "seconds")),
    ("peak RSS 64 GiB sparse <= 1.5x 2 GiB (ratio 2 GiB / 64 GiB >= 0.67)", 1 / 1.5,
     ("full", SV, "peak_rss_kib"), ("sparse-64g", SV, "peak_rss_kib")),
)  # fmt: skip


def targets(runs: list[list[Measurement]]) -> list[dict[str, object]]:
    """The issue's targets as ratios computed within each run (the tools of one run share
    the machine's load), judged on their median; min and max show the spread."""
    rows: list[dict[str, object]] = []
    for name, goal, (p1, t1, f1), (p2, t2, f2) in RATIOS:
        values = []
        for run in runs:
            by = {(m.phase, m.tool): m for m in run}
            if (p1, t1) in by and (p2, t2) in by:
                values.append(getattr(by[(p1, t1)], f1) / getattr(by[(p2, t2)], f2))
        if not values:
            continue
        median = statistics.median(values)
        rows.append({
            "target": name, "met": median >= goal, "median": round(median, 3),
            "min": round(min(values), 3), "max": round(max(values), 3),
        })  # fmt: skip
    return rows


def print_table(s: dict[str, dict[str, dict[str, float]]], n_runs: int) -> None:
    print(f"\nmedians of {n_runs} run(s); min-max in brackets")
    print(f"{'phase':<13} {'tool':<12} {'seconds':>18} {'peak RSS MiB':>13} {'repo MiB':>9}")
    for phase, per_tool in s.items():
        for tool, v in per_tool.items():
            spread = f"{v['seconds']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"
            print(
                f"{phase:<13} {tool:<12} {spread:>18} {v['peak_rss_mib']:13.1f} "
                f"{v['repo_mib']:9.1f}"
            )


def main() -> int:
    """Build the dataset, run every tool through the phases, print and save the results."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/stratavault-bench"))
    parser.add_argument("--tools", default="stratavault,restic,borg")
    parser.add_argument("--name", default="disks")
    parser.add_argument(
        "--src", default="", help="run stratavault from this source folder (PYTHONPATH)"
    )
    parser.add_argument("--chunk-kib", type=int, default=0, help="stratavault's --chunk-size")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    if BENCH_DIR.parent in (workdir, *workdir.parents):
        parser.error("--workdir must be outside the project tree")
    workdir.mkdir(parents=True, exist_ok=True)
    ds = dataset(workdir)
    compile_package(args.src)
    names = args.tools.split(",")
    print(
        f"image: {IMAGE_BYTES >> 30} GiB ext4, {ds.info['files']} files, data "
        f"{int(ds.info['image_data_bytes']) / 2**30:.2f} GiB; change "
        f"{int(ds.info['changed_bytes']) >> 20} MiB; load {os.getloadavg()[0]:.1f}"
    )
    runs: list[list[Measurement]] = []
    load = os.getloadavg()[0]
    try:
        for number in range(1, args.runs + 1):
            runs.append(one_run(ds, workdir, names, number, args))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    summary = summarise(runs)
    print_table(summary, len(runs))
    targets_doc = targets(runs)
    print("\ntargets (ratios within each run: median [min-max])")
    for t in targets_doc:
        verdict = "MET    " if t["met"] else "NOT MET"
        print(f"  {verdict} {t['target']}: {t['median']:.2f} [{t['min']:.2f}-{t['max']:.2f}]")
    info = {k: v for k, v in ds.info.items() if k != "changed_offsets"}
    doc = {
        "name": args.name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "load_at_start": load,
        "load_at_end": os.getloadavg()[0],
        "dataset": info,
        "summary": summary,
        "targets": targets_doc,
        "runs": [[asdict(m) for m in run] for run in runs],
    }
    path = BENCH_DIR / "results" / f"{args.name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
