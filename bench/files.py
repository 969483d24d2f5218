"""File-backup benchmark: stratavault against restic and borg on the same real file tree.

    .venv/bin/python bench/files.py [--size-gib 1] [--files 50000] [--workdir DIR]
                                    [--tools stratavault,restic,borg] [--name NAME]

Dataset (built once, cached in WORKDIR): at least --files regular files and --size-gib GiB
copied from /usr in a deterministic order (sha256 of the path; files up to 16 MiB), topped
up with generated files when /usr is too small. Each run copies it to WORKDIR/src, and all
tools back up that one path: first backup, then a deterministic change (~2 % of files
modified in place, some added, some deleted) and a second backup, a third backup with no
change, and a restore of the latest backup (checked by file count and bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import stat
import sys
import time
from pathlib import Path

from _harness import (
    BenchError,
    Benchmark,
    Phase,
    Tool,
    compile_package,
    format_results,
    make_tool,
    write_results,
)

DATASET_VERSION = 1
DESCRIPTION = "File-backup benchmark: stratavault against restic and borg on the same tree."
MAX_FILE_BYTES = 16 * 2**20
WORDS = ("backup", "restore", "snapshot", "chunk", "pack", "index", "tree", "vault", "disk")


def list_usr(root: Path) -> list[tuple[bytes, Path, int]]:
    """Regular files under root as (sort key, path, size), in deterministic order."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_FILE_BYTES:
                key = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
                found.append((key, path, st.st_size))
    found.sort()
    return found


def generated_bytes(rng: random.Random, size: int) -> bytes:
    """Half compressible text, half random bytes."""
    text = bytearray()
    while len(text) < size // 2:
        text += (" ".join(rng.choices(WORDS, k=10)) + "\n").encode()
    return bytes(text[: size // 2]) + rng.randbytes(size - size // 2)


def build_dataset(base: Path, n_files: int, n_bytes: int, usr: Path) -> dict[str, int]:
    """Copy files from usr into base until both targets are met; top up with generated files."""
    files = total = generated = 0
    for _key, path, size in list_usr(usr):
        if files >= n_files and total >= n_bytes:
            break
        dest = base / "usr" / path.relative_to(usr)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(path, dest)
        except OSError:
            continue
        dest.chmod(0o644)
        files += 1
        total += size
    rng = random.Random(1)
    while files < n_files or total < n_bytes:
        size = rng.choice((1000, 20_000, 300_000, 4_000_000))
        dest = base / "generated" / f"{generated // 1000:03d}" / f"file{generated:06d}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(generated_bytes(rng, size))
        files, total, generated = files + 1, total + size, generated + 1
    return {"files": files, "bytes": total, "generated_files": generated}


def dataset(workdir: Path, n_files: int, n_bytes: int) -> tuple[Path, dict[str, int]]:
    """The cached base tree for these parameters (built on first use)."""
    home = workdir / f"dataset-v{DATASET_VERSION}-{n_files}f-{n_bytes}b"
    manifest = home / "manifest.json"
    if manifest.exists():
        return home / "base", json.loads(manifest.read_text())
    if home.exists():
        shutil.rmtree(home)
    print(f"building dataset in {home} (once; cached)")
    start = time.perf_counter()
    info = build_dataset(home / "base", n_files, n_bytes, Path("/usr"))
    manifest.write_text(json.dumps(info) + "\n")
    took = time.perf_counter() - start
    print(f"  {info['files']} files, {info['bytes'] / 2**30:.2f} GiB in {took:.0f} s")
    return home / "base", info


def regular_files(root: Path) -> list[Path]:
    """Every regular file below root, sorted."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / n for n in sorted(filenames))
    return [p for p in out if p.is_file() and not p.is_symlink()]


def apply_changes(src: Path, seed: int = 2) -> str:
    """Deterministically change ~2 % of files in place, delete 0.5 %, add 0.5 % new files."""
    rng = random.Random(seed)
    files = regular_files(src)
    picked = rng.sample(files, k=max(1, len(files) * 25 // 1000))
    modify, delete = picked[: len(files) // 50], picked[len(files) // 50 :]
    for i, path in enumerate(modify):
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            if i % 3 == 0:  # append
                fh.seek(0, os.SEEK_END)
                fh.write(generated_bytes(rng, 4096))
            elif i % 3 == 1:  # overwrite a range in the middle
                fh.seek(size // 2)
                fh.write(rng.randbytes(min(65536, max(1, size // 4))))
            else:  # cut the tail and write a new one
                fh.truncate(size // 2)
                fh.seek(size // 2)
                fh.write(generated_bytes(rng, 8192))
    for path in delete:
        path.unlink()
    added = len(delete)
    for i in range(added):
        parent = rng.choice(files).parent if i % 2 else src / "added"
        parent.mkdir(exist_ok=True)
        (parent / f"added-{i:05d}").write_bytes(generated_bytes(rng, rng.choice((500, 50_000))))
    return f"modified {len(modify)}, deleted {len(delete)}, added {added} files"


def tree_summary(root: Path) -> tuple[int, int]:
    """(regular files, total bytes) below root."""
    files = total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            st = (Path(dirpath) / name).lstat()
            if stat.S_ISREG(st.st_mode):
                files, total = files + 1, total + st.st_size
    return files, total


def main() -> int:
    """Build the dataset, run every tool through the phases, print and save the results."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/stratavault-bench"))
    parser.add_argument("--tools", default="stratavault,restic,borg,borg-zstd")
    parser.add_argument("--name", default="files-" + time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--no-drop-cache", action="store_true")
    args = parser.parse_args()
    compile_package("")

    workdir = args.workdir.resolve()
    if Path(__file__).resolve().parent.parent in (workdir, *workdir.parents):
        parser.error("--workdir must be outside the project tree")
    workdir.mkdir(parents=True, exist_ok=True)
    base, info = dataset(workdir, args.files, int(args.size_gib * 2**30))
    src = workdir / "src"
    tools: list[Tool] = [make_tool(n, workdir / "tools" / n) for n in args.tools.split(",")]
    for tool in tools:
        if (why := tool.available()) is not None:
            parser.error(f"tool {tool.name} cannot run: {why}")

    def fresh_copy() -> str:
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(base, src)
        return f"copied the dataset to {src}"

    expected: list[tuple[int, int]] = []

    def no_change() -> str:
        expected.append(tree_summary(src))
        return "no change"

    def check_restore(tool: Tool, target: Path) -> str:
        got = tree_summary(tool.restored_root(target, src))
        if got != expected[-1]:
            raise BenchError(f"{tool.name} restored {got} (files, bytes), expected {expected[-1]}")
        return f"restore ok ({got[0]} files)"

    phases = [
        Phase("backup1", "backup", prepare=fresh_copy),
        Phase("backup2", "backup", prepare=lambda: apply_changes(src)),
        Phase("backup3", "backup", prepare=no_change),
        Phase("restore", "restore"),
    ]
    bench = Benchmark(tools, phases, [src], workdir, check_restore, not args.no_drop_cache)
    print(f"dataset: {info['files']} files, {info['bytes'] / 2**30:.2f} GiB; tools: {args.tools}")
    try:
        bench.run()
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if src.exists():
            shutil.rmtree(src)
    print()
    print(f"page cache dropped before each timed run: {'yes' if bench.cache_dropped else 'NO'}")
    print(format_results(bench.measurements, baseline=tools[0].name))
    path = write_results(args.name, bench, {"dataset": info}, baseline=tools[0].name)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
