"""Instant recovery speed, with the real test guest (TCG), written to bench/results/instant.json.

- Boot to the guest's first line after it mounted its root filesystem ("stratavault-guest: init
  started"), for a 1 GiB and a 64 GiB (sparse) boot disk: from the `stratavault restore vm
  --instant` command (a new process: interpreter start, repository opening, serving process,
  overlays, QEMU) beside the same guest booted by QEMU from a local copy of the disk.
  Targets: instant within 1.5x of local; 64 GiB within 1.2x of 1 GiB.
- `restore vm --instant --migrate-to`: time until a 2 GiB data disk full of random data (and
  the boot disk) have moved to local storage while the guest runs.

Runs are interleaved (local, instant 1 GiB, instant 64 GiB, again...) so that the load of the
shared machine falls on all alike; medians are reported.

    python bench/instant.py [--runs N] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from tests.guest.build import INIT_MARKER, GuestImage, ensure_image, make_data_disk  # noqa: E402
from tests.guest.vm import GuestVM  # noqa: E402

from stratavault.jobs import BackupVmOptions, backup_vm  # noqa: E402
from stratavault.repo import KdfParams, Repository  # noqa: E402
from stratavault.sources import QmpSession  # noqa: E402
from stratavault.storage import LocalStorage  # noqa: E402

GiB = 1 << 30
PASSWORD = b"stratavault-bench"
STRATAVAULT = Path(sys.executable).with_name("stratavault")


def _wait_marker(log: Path, marker: str, start: float, timeout_s: float = 300) -> float:
    while marker not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"{marker!r} not in {log} after {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - start


def _backup_paused(repo: Repository, image: GuestImage, disks: list[Path], name: str) -> str:
    """Back up the guest paused before it ran; the snapshot id."""
    folder = disks[0].parent
    vm = GuestVM(image, disks, log_path=folder / "serial.log", extra_args=["-S"])
    try:
        vm.start()
        while not vm.qmp_path.exists():
            time.sleep(0.05)
        snap = backup_vm(repo, BackupVmOptions(qmp_socket=vm.qmp_path, name=name, host="bench"))
    finally:
        vm.cleanup()
    return snap.id


def _env(work: Path) -> dict[str, str]:
    (work / "password").write_bytes(PASSWORD + b"\n")
    return {**os.environ, "STRATAVAULT_REPOSITORY": str(work / "repo"),
            "STRATAVAULT_PASSWORD_FILE": str(work / "password"),
            "STRATAVAULT_CACHE_DIR": str(work / "cache")}  # fmt: skip


def _stop_instant(run: Path) -> None:
    """Quit the instant VM; its serving process ends with it."""
    try:
        with QmpSession(run / "qmp.sock", timeout_s=10) as qmp:
            qmp.execute("quit")
    except Exception:
        for name in ("qemu.pid", "server.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((run / name).read_text()), signal.SIGKILL)
    server = run / "server.pid"
    deadline = time.monotonic() + 15
    while server.exists() and Path(f"/proc/{server.read_text().strip()}").exists():
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)


def instant_boot(env: dict[str, str], snap: str, run: Path) -> float:
    """Seconds from the command to the init marker of the instant VM."""
    shutil.rmtree(run, ignore_errors=True)
    start = time.monotonic()
    done = subprocess.run(
        [str(STRATAVAULT), "restore", "vm", snap, "--instant", "--to", str(run), "-q"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"restore vm --instant failed: {done.stderr}")
    try:
        return _wait_marker(run / "serial.log", INIT_MARKER, start)
    finally:
        _stop_instant(run)


def local_boot(image: GuestImage, boot: Path, data: Path, folder: Path) -> float:
    """Seconds from starting QEMU to the init marker, on local disks."""
    copy = folder / "local-boot.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(boot), str(copy)], check=True)
    log = folder / "local.log"
    log.unlink(missing_ok=True)  # QEMU truncates it only once it opens it
    vm = GuestVM(image, [copy, data], log_path=log)
    try:
        vm.start()
        return _wait_marker(vm.log_path, INIT_MARKER, vm.started_at)
    finally:
        vm.cleanup()
        copy.unlink()


def migrate(env: dict[str, str], snap: str, work: Path) -> dict[str, object]:
    """Instant start plus the move of every disk to local storage."""
    run, local = work / "run-mig", work / "local-mig"
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(STRATAVAULT), "restore", "vm", snap, "--instant", "--to", str(run),
         "--migrate-to", str(local), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    started = time.monotonic() - start
    if not first:
        raise RuntimeError(f"migrate: {proc.stderr.read() if proc.stderr else ''}")
    _, err = proc.communicate(timeout=1800)
    total = time.monotonic() - start
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"migrate failed: {err}")
        booted = _wait_marker(run / "serial.log", INIT_MARKER, start)
    finally:
        _stop_instant(run)
    sizes = {p.name: p.stat().st_size for p in local.iterdir() if p.suffix in (".qcow2", ".raw")}
    return {
        "vm_running_s": round(started, 2),
        "migrated_s": round(total, 2),
        "init_marker_s": round(booted, 2),
        "local_files_bytes": sizes,
    }


def _random_disk(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(size // (64 << 20)):
            f.write(os.urandom(64 << 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "instant.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="sv-bi-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    image = ensure_image()
    repo = Repository.init(LocalStorage(work / "repo"), PASSWORD, cache_dir=None,
                           kdf=KdfParams.fast())  # fmt: skip
    env = _env(work)
    snaps: dict[str, str] = {}
    boots: dict[str, tuple[Path, Path]] = {}
    for label, size in (("1GiB", GiB), ("64GiB", 64 * GiB)):
        folder = work / label
        folder.mkdir()
        boot = image.boot_overlay(folder / "boot0.qcow2", size=size)
        data = make_data_disk(folder / "data0.qcow2", {"hello.txt": b"hello\n"})
        snaps[label] = _backup_paused(repo, image, [boot, data], f"guest-{label}")
        boots[label] = (boot, data)
        print(f"backed up the {label} guest: {snaps[label][:8]}", flush=True)
    times: dict[str, list[float]] = {"local_1GiB": [], "instant_1GiB": [], "instant_64GiB": []}
    for n in range(args.runs):
        times["local_1GiB"].append(local_boot(image, *boots["1GiB"], work / "1GiB"))
        for label in ("1GiB", "64GiB"):
            times[f"instant_{label}"].append(instant_boot(env, snaps[label], work / f"run-{label}"))
        print(f"run {n + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)  # fmt: skip
    medians = {k: round(statistics.median(v), 2) for k, v in times.items()}
    # migration: a 2 GiB data disk full of random data
    folder = work / "mig"
    folder.mkdir()
    boot = image.boot_overlay(folder / "boot0.qcow2", size=GiB)
    data = folder / "data0.raw"
    _random_disk(data, 2 * GiB)
    t0 = time.monotonic()
    snap = _backup_paused(repo, image, [boot, data], "guest-mig")
    backup_s = time.monotonic() - t0
    print(f"backed up the 2 GiB guest in {backup_s:.1f} s", flush=True)
    migration = migrate(env, snap, work)
    print(f"migration: {migration}", flush=True)
    result = {
        "benchmark": "instant recovery (bench/instant.py)",
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "python": platform.python_version(),
        },
        "boot_to_init_marker_s": {"runs": times, "median": medians},
        "ratios": {
            "instant_1GiB_vs_local": round(medians["instant_1GiB"] / medians["local_1GiB"], 2),
            "instant_64GiB_vs_local": round(medians["instant_64GiB"] / medians["local_1GiB"], 2),
            "instant_64GiB_vs_1GiB": round(medians["instant_64GiB"] / medians["instant_1GiB"], 2),
        },
        "targets": {"instant_vs_local": 1.5, "64GiB_vs_1GiB": 1.2},
        "migrate_2GiB_random": {**migration, "backup_s": round(backup_s, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ratios"]), flush=True)
    repo.close()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
