"""File-level restore speed: a 100 MiB file out of ext4 and NTFS disk snapshots, and the
listing of a 20,000-entry folder (ext4 and XFS), straight out of the repository.

Images are made without mounting (mke2fs -d, mkntfs + ntfscp, mkfs.xfs -p), backed up
with ``backup_disks`` (the default 1 MiB... chunk size of ``backup image``), then:

- ``restore``: ``flr_restore`` of the 100 MiB file into a fresh folder (a new DiskReader
  each run: every chunk is read from the packs, decrypted and decompressed); MB/s of file
  data; also ``flr_dump`` to /dev/null, and the ``stratavault restore`` command end to end;
- ``list``: ``flr_list`` of the folder (name, type, mode, owner, size, times of every
  entry), and ``stratavault ls --no-recursive`` end to end.

Targets (issue 5): restore >= 150 MB/s, listing < 2 s.

    python bench/flr.py [--work DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BENCH_DIR, machine_info
from stratavault.jobs import (
    BackupDisksOptions,
    FlrRestoreOptions,
    backup_disks,
    flr_dump,
    flr_list,
    flr_restore,
    parse_flr_ref,
)
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import Snapshot
from stratavault.sources import RawDiskSource
from stratavault.storage import LocalStorage

MiB = 1 << 20
BIG = 100 * MiB
ENTRIES = 20_000
PASSWORD = "flr-bench"


def sh(*args: str | Path, stdin: str | None = None) -> None:
    subprocess.run([str(a) for a in args], input=stdin, check=True, capture_output=True, text=True)


def make_images(work: Path) -> dict[str, Path]:
    """ext4 and NTFS images with a 100 MiB random file; ext4 and XFS with 20,000 entries."""
    payload = work / "big.bin"
    payload.write_bytes(os.urandom(BIG))
    tree = work / "tree-big"
    tree.mkdir()
    shutil.copy(payload, tree / "big.bin")
    images = {"ext4-big": work / "ext4-big.img", "ntfs-big": work / "ntfs-big.img"}
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, images["ext4-big"], "160M")
    with images["ntfs-big"].open("wb") as f:
        f.truncate(160 * MiB)
    sh("mkntfs", "-q", "-F", "-f", images["ntfs-big"])
    sh("ntfscp", "-f", images["ntfs-big"], payload, "big.bin")
    many = work / "tree-many" / "many"
    many.mkdir(parents=True)
    for i in range(ENTRIES):
        (many / f"file-{i:05d}.txt").write_text(f"{i}\n")
    images["ext4-many"] = work / "ext4-many.img"
    sh(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-N",
        "30000",
        "-d",
        many.parent,
        images["ext4-many"],
        "200M",
    )
    proto = work / "many.proto"
    lines = ["/", "0 0", "d--755 0 0", "many d--755 0 0"]
    lines += [f"file-{i:05d}.txt ---644 0 0 {many / f'file-{i:05d}.txt'}" for i in range(ENTRIES)]
    proto.write_text("\n".join([*lines, "$", "$"]) + "\n")
    images["xfs-many"] = work / "xfs-many.img"
    sh(
        "mkfs.xfs",
        "-q",
        "-f",
        "-d",
        f"agcount=2,file,name={images['xfs-many']},size=300m",
        "-p",
        proto,
    )
    return images


def best(runs: int, fn: Callable[[], object]) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flr-bench-", dir=args.work))
    try:
        results = run(work, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = BENCH_DIR / "results" / "flr.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), **results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"written to {out}")


def run(work: Path, runs: int) -> dict[str, object]:
    t0 = time.perf_counter()
    images = make_images(work)
    print(f"images made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    storage = LocalStorage(work / "repo")
    Repository.init(storage, PASSWORD.encode(), cache_dir=None, kdf=KdfParams.fast()).close()
    repo = Repository.open(storage, PASSWORD.encode(), cache_dir=work / "cache")
    snaps: dict[str, Snapshot] = {}
    for name, path in images.items():
        with RawDiskSource(path) as source:
            snaps[name] = backup_disks(repo, [source], BackupDisksOptions(paths=(str(path),)))
    results: dict[str, object] = {"runs": runs, "file_bytes": BIG, "entries": ENTRIES}
    for name in ("ext4-big", "ntfs-big"):
        results[f"restore_{name}"] = measure_restore(work, repo, snaps[name], images[name], runs)
    for name in ("ext4-many", "xfs-many"):
        results[f"list_{name}"] = measure_list(work, repo, snaps[name], images[name], runs)
    repo.close()
    return results


def measure_restore(
    work: Path, repo: Repository, snap: Snapshot, image: Path, runs: int
) -> dict[str, object]:
    """flr_restore and flr_dump of the 100 MiB file (library), and the restore command."""
    ref = parse_flr_ref(f"{snap.id}:{image.name}/big.bin")
    counter = iter(range(1000))

    def restore() -> None:
        target = work / f"out-{next(counter)}"
        flr_restore(repo, snap, ref, FlrRestoreOptions(target=target))
        assert (target / "big.bin").stat().st_size == BIG
        shutil.rmtree(target)

    def dump() -> None:
        with open(os.devnull, "wb") as sink:
            flr_dump(repo, snap, ref, sink)

    seconds, all_s = best(runs, restore)
    dump_s, _ = best(runs, dump)
    out = work / "cli-out"
    cli_s = cli_time(work, ["restore", f"{snap.id}:{image.name}/big.bin", "--target", out, "-q"])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": round(seconds, 3),
        "MB_per_s": round(BIG / seconds / 1e6, 1),
        "all_seconds": [round(s, 3) for s in all_s],
        "dump_MB_per_s": round(BIG / dump_s / 1e6, 1),
        "cli_seconds": round(cli_s, 3),
        "cli_MB_per_s": round(BIG / cli_s / 1e6, 1),
    }


def measure_list(
    work: Path, repo: Repository, snap: Snapshot, image: Path, runs: int
) -> dict[str, object]:
    """flr_list of the 20,000-entry folder (library), and ``ls --no-recursive -l``."""
    ref = parse_flr_ref(f"{snap.id}:{image.name}/many")

    def listing() -> None:
        count = sum(1 for _ in flr_list(repo, snap, ref))
        assert count == ENTRIES, count

    seconds, all_s = best(runs, listing)
    cli_s = cli_time(work, ["ls", f"{snap.id}:{image.name}/many", "--no-recursive", "-l"])
    return {
        "seconds": round(seconds, 3),
        "all_seconds": [round(s, 3) for s in all_s],
        "cli_seconds": round(cli_s, 3),
    }


def cli_time(work: Path, args: list[str | Path]) -> float:
    env = {
        **os.environ,
        "STRATAVAULT_REPOSITORY": str(work / "repo"),
        "STRATAVAULT_PASSWORD": "",
        "STRATAVAULT_CACHE_DIR": str(work / "cache"),
    }
    (work / "password").write_text(PASSWORD + "\n")
    env["STRATAVAULT_PASSWORD_FILE"] = str(work / "password")
    exe = Path(sys.executable).with_name("stratavault")
    t0 = time.perf_counter()
    subprocess.run([str(exe), *map(str, args)], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
