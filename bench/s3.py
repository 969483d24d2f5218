"""S3 benchmark: stratavault against a raw boto3 transfer and restic, on a local SeaweedFS.

    .venv/bin/python bench/s3.py [--size-gib 1] [--files 5000] [--threads 2]
                                 [--workdir DIR] [--name s3] [--no-drop-cache]

Starts a SeaweedFS (``weed mini`` from the venv, as the tests do) on free local ports, builds
the dataset of bench/files.py (files copied from /usr, topped up with generated ones; cached
in WORKDIR), and measures on the same bytes, page cache dropped before each timed step:

- **raw put / raw get**: every file of the dataset as one object, uploaded (then downloaded
  and written back to disk) by boto3 with ``--threads`` requests at once: what a program
  that just copies the files to the bucket would take;
- **raw pack put / get**: objects of exactly the sizes stratavault stored (its packs, index,
  snapshot), at the same parallelism: the transport alone, without reading, chunking,
  compressing or encrypting anything;
- **stratavault** backup to ``s3:`` and restore from it (the CLI, as a user runs it);
- **restic** backup to and restore from ``s3:http://...`` on the same server.

Targets (issue 6): backup rate >= 80 % of the raw put rate, restore >= 80 % of the raw get
rate, and faster than restic. Results go to bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import (
    BENCH_DIR,
    PROJECT_ROOT,
    BenchError,
    ResticTool,
    StratavaultTool,
    Tool,
    drop_caches,
    machine_info,
    run_measured,
)
from files import generated_bytes, regular_files, tree_summary

sys.path.insert(0, str(PROJECT_ROOT))
from tests.s3server import S3Server, _port_base, _start, _wait_ready, secret, stop

BUCKET = "bench"


@dataclass
class S3Stratavault(StratavaultTool):
    """stratavault with its repository in the bucket."""

    endpoint: str = ""
    prefix: str = "stratavault"

    def env(self) -> dict[str, str]:
        env = super().env()
        env["STRATAVAULT_REPOSITORY"] = f"s3:{self.endpoint}/{BUCKET}/{self.prefix}"
        env.update(AWS_ACCESS_KEY_ID="admin", AWS_SECRET_ACCESS_KEY=secret("admin"))
        return env


@dataclass
class S3Restic(ResticTool):
    """restic with its repository in the bucket."""

    endpoint: str = ""
    prefix: str = "restic"

    def env(self) -> dict[str, str]:
        env = super().env()
        env["RESTIC_REPOSITORY"] = f"s3:{self.endpoint}/{BUCKET}/{self.prefix}"
        env.update(AWS_ACCESS_KEY_ID="admin", AWS_SECRET_ACCESS_KEY=secret("admin"))
        return env


def dataset(workdir: Path, n_files: int, n_bytes: int) -> tuple[Path, dict[str, int]]:
    """``n_files`` generated files of ``n_bytes`` in all (half text, half random bytes, as
    bench/files.py tops up its trees), sizes from 4 KiB to 8x the mean, in 50 folders;
    built once and cached in ``workdir``."""
    home = workdir / f"s3-dataset-v1-{n_files}f-{n_bytes}b"
    if (home / "done").exists():
        return home / "base", {"files": n_files, "bytes": n_bytes}
    shutil.rmtree(home, ignore_errors=True)
    rng = random.Random(6)
    mean = n_bytes // n_files
    sizes = [rng.choice((4096, mean // 4, mean // 2, mean, 2 * mean)) for _ in range(n_files)]
    sizes[-1] += n_bytes - sum(sizes)  # one large file takes up the rest
    if sizes[-1] < 0:
        raise BenchError(f"cannot make {n_files} files of {n_bytes} bytes")
    for n, size in enumerate(sizes):
        path = home / "base" / f"d{n % 50:02d}" / f"f{n:06d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(generated_bytes(rng, size))
    (home / "done").touch()
    return home / "base", {"files": n_files, "bytes": n_bytes}


def _timed(drop: bool, work: Callable[[], int]) -> dict[str, float]:
    """Run ``work`` (returns bytes moved) after dropping the page cache: seconds, MB/s."""
    if drop:
        drop_caches()
    start = time.perf_counter()
    moved = work()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": moved, "mb_per_s": moved / seconds / 1e6}


class RawTransfer:
    """Plain boto3 puts and gets, ``threads`` at a time (the baseline)."""

    def __init__(self, server: S3Server, threads: int) -> None:
        import boto3
        import botocore.config

        self.client = boto3.client(
            "s3", endpoint_url=server.endpoint, aws_access_key_id="admin",
            aws_secret_access_key=secret("admin"), region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, max_pool_connections=max(10, threads)
            ),
        )  # fmt: skip
        self.threads = threads

    def put_files(self, root: Path, prefix: str) -> int:
        files = regular_files(root)

        def put(path: Path) -> int:
            data = path.read_bytes()
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            self.client.put_object(Bucket=BUCKET, Key=key, Body=data)
            return len(data)

        with ThreadPoolExecutor(self.threads) as pool:
            return sum(pool.map(put, files))

    def get_files(self, prefix: str, target: Path) -> int:
        def get(key: str) -> int:
            data = self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            path = target / key[len(prefix) + 1 :]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return len(data)

        with ThreadPoolExecutor(self.threads) as pool:
            return sum(pool.map(get, self.keys(prefix)))

    def put_sizes(self, sizes: list[int], prefix: str) -> int:
        blob = os.urandom(max(sizes))

        def put(item: tuple[int, int]) -> int:
            n, size = item
            body = blob[:size]
            self.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{n:06d}", Body=body)
            return size

        with ThreadPoolExecutor(self.threads) as pool:
            return sum(pool.map(put, enumerate(sizes)))

    def get_all(self, prefix: str) -> int:
        def get(key: str) -> int:
            return len(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

        with ThreadPoolExecutor(self.threads) as pool:
            return sum(pool.map(get, self.keys(prefix)))

    def keys(self, prefix: str) -> list[str]:
        return [key for key, _ in self.listing(prefix)]

    def listing(self, prefix: str) -> list[tuple[str, int]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix + "/"
        )
        return [(o["Key"], o["Size"]) for p in pages for o in p.get("Contents", [])]


def run(args: argparse.Namespace, server: S3Server) -> int:
    """Every measurement, ``--repeat`` times (each round in a fresh prefix, tools taking
    turns, so that the load of a shared machine hits all alike); medians are compared."""
    workdir = args.workdir.resolve()
    base, info = dataset(workdir, args.files, int(args.size_gib * 2**30))
    src = workdir / "src-s3"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(base, src)
    expected = tree_summary(src)
    server.client().create_bucket(Bucket=BUCKET)
    drop = not args.no_drop_cache
    raw = RawTransfer(server, args.threads)
    print(f"dataset: {info['files']} files, {info['bytes'] / 2**30:.2f} GiB; {server.endpoint}")
    samples: dict[str, list[dict[str, float]]] = {}
    for round_ in range(1, args.repeat + 1):
        for name, sample in _round(args, raw, server, src, expected, round_, drop).items():
            samples.setdefault(name, []).append(sample)
            print(f"  round {round_} {name:<20} {sample['seconds']:8.2f} s", flush=True)
    shutil.rmtree(src)
    return _report(args, samples, info)


def _round(
    args: argparse.Namespace, raw: RawTransfer, server: S3Server, src: Path,
    expected: tuple[int, int], round_: int, drop: bool,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """One round of every measurement, each tool's repository under its own prefix."""
    out: dict[str, dict[str, float]] = {}
    out["raw put"] = _timed(drop, lambda: raw.put_files(src, f"raw{round_}"))
    restored = args.workdir.resolve() / "raw-get"
    out["raw get"] = _timed(drop, lambda: raw.get_files(f"raw{round_}", restored))
    shutil.rmtree(restored)
    home = args.workdir.resolve() / "tools-s3"
    tools: list[Tool] = [
        S3Stratavault("stratavault", home / "stratavault", endpoint=server.endpoint,
                      prefix=f"stratavault{round_}"),
        S3Restic("restic", home / "restic", endpoint=server.endpoint, prefix=f"restic{round_}"),
    ]  # fmt: skip
    for tool in tools:
        shutil.rmtree(tool.home, ignore_errors=True)
        tool.home.mkdir(parents=True)
        run_measured(tool.init_cmd(), tool.env(), tool.home, tool.home / "init.log")
        out[f"{tool.name} backup"] = _measured(tool, tool.backup_cmd([src], 1), tool.home, drop)
    for tool in tools:
        target = args.workdir.resolve() / "restore" / tool.name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        out[f"{tool.name} restore"] = _measured(tool, tool.restore_cmd(target, 1), target, drop)
        got = tree_summary(tool.restored_root(target, src))
        if got != expected:
            raise BenchError(f"{tool.name} restored {got} (files, bytes), expected {expected}")
        shutil.rmtree(target)
    stored = raw.listing(f"stratavault{round_}")
    sizes = [size for _, size in stored]
    out["raw pack put"] = _timed(drop, lambda: raw.put_sizes(sizes, f"packs{round_}"))
    out["raw pack get"] = _timed(drop, lambda: raw.get_all(f"packs{round_}"))
    out["stratavault stored"] = {"seconds": 0.0, "bytes": sum(sizes), "objects": len(sizes)}
    restic_bytes = sum(size for _, size in raw.listing(f"restic{round_}"))
    out["restic stored"] = {"seconds": 0.0, "bytes": restic_bytes}
    return out


def _measured(tool: Tool, cmd: list[str], cwd: Path, drop: bool) -> dict[str, float]:
    if drop:
        drop_caches()
    seconds, rss_kib = run_measured(cmd, tool.env(), cwd, tool.home / "last.log")
    return {"seconds": seconds, "peak_rss_mib": rss_kib / 1024}


def _report(
    args: argparse.Namespace, samples: dict[str, list[dict[str, float]]], info: dict[str, int]
) -> int:
    median = {name: statistics.median(s["seconds"] for s in runs) for name, runs in samples.items()}
    backup, restore = median["stratavault backup"], median["stratavault restore"]
    ratios = {
        "backup_vs_raw_put": median["raw put"] / backup,
        "restore_vs_raw_get": median["raw get"] / restore,
        "backup_vs_raw_pack_put": median["raw pack put"] / backup,
        "restore_vs_raw_pack_get": median["raw pack get"] / restore,
        "restic_backup_over_stratavault": median["restic backup"] / backup,
        "restic_restore_over_stratavault": median["restic restore"] / restore,
    }
    targets = {
        "backup >= 80 % of raw put": ratios["backup_vs_raw_put"] >= 0.8,
        "restore >= 80 % of raw get": ratios["restore_vs_raw_get"] >= 0.8,
        "backup faster than restic": ratios["restic_backup_over_stratavault"] > 1,
        "restore faster than restic": ratios["restic_restore_over_stratavault"] > 1,
    }
    print(f"\nmedians of {args.repeat} rounds (page cache dropped: {not args.no_drop_cache}):")
    for name, runs in samples.items():
        if not name.endswith("stored"):
            spread = ", ".join(f"{r['seconds']:.2f}" for r in runs)
            print(f"  {name:<20} {median[name]:8.2f} s   ({spread})")
    stored = samples["stratavault stored"][0]["bytes"]
    print(f"  stored: stratavault {stored / 2**20:.1f} MiB, "
          f"restic {samples['restic stored'][0]['bytes'] / 2**20:.1f} MiB")  # fmt: skip
    print("ratios (baseline time / stratavault time = stratavault rate / baseline rate):")
    for name, value in ratios.items():
        print(f"  {name:<32} {value:5.2f}")
    for target, met in targets.items():
        print(f"  {'met   ' if met else 'MISSED'} {target}")
    path = BENCH_DIR / "results" / f"{args.name}.json"
    doc = {
        "name": args.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(), "page_cache_dropped": not args.no_drop_cache,
        "dataset": info, "threads": args.threads, "repeat": args.repeat,
        "median_seconds": median, "samples": samples, "ratios": ratios, "targets_met": targets,
    }  # fmt: skip
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2, help="raw transfers at once")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/stratavault-bench"))
    parser.add_argument("--name", default="s3")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are compared")
    parser.add_argument("--no-drop-cache", action="store_true")
    args = parser.parse_args()
    if PROJECT_ROOT in (args.workdir.resolve(), *args.workdir.resolve().parents):
        parser.error("--workdir must be outside the project tree")
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=args.workdir))
    process, log = _start(folder, _port_base("bench"))
    server = S3Server(f"http://127.0.0.1:{_port_base_of(process)}", process, log)
    try:
        _wait_ready(server)
        return run(args, server)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(process)
        shutil.rmtree(folder, ignore_errors=True)


def _port_base_of(process: Any) -> int:
    """The S3 port of a ``weed mini`` started by tests/s3server.py (base + 3)."""
    port = next(a for a in process.args if str(a).startswith("-s3.port="))
    return int(str(port).split("=", 1)[1])


if __name__ == "__main__":
    sys.exit(main())
