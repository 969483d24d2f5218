"""Disk chunk size: what a full and a bitmap-driven incremental backup cost per chunk size.

A 1 GiB sparse raw image with ~50 % data (half random, half compressible, in extents of
64 KiB to 8 MiB) is backed up, then ~2 % of it is changed the way a file system writes
(clusters of 4 KiB writes plus a few contiguous 1 MiB files) and backed up again from the
changed extents at QEMU's 64 KiB bitmap granularity. For each chunk size: time, bytes
read, repository growth, disk index size, and what the index costs per TiB of disk.
The image stays in the page cache (warm reads), as in reference/facts.md.

    python bench/disk_chunk_sizes.py [--sizes-kib 64,256,1024,4096] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from stratavault.jobs import BackupDisksOptions, backup_disks
from stratavault.repo import KdfParams, Repository
from stratavault.storage import LocalStorage

MiB = 1 << 20
SIZE = 1 << 30
GRANULARITY = 64 << 10
TiB = 1 << 40


def make_image(path: Path, rng: random.Random) -> list[tuple[int, int]]:
    """Write the base image; return its data extents."""
    words = [rng.randbytes(rng.randrange(3, 12)).hex().encode() for _ in range(2000)]
    extents: list[tuple[int, int]] = []
    with path.open("wb") as f:
        f.truncate(SIZE)
        pos = 0
        while pos < SIZE:
            length = min(rng.randrange(64 << 10, 8 * MiB) // 4096 * 4096, SIZE - pos)
            if rng.random() < 0.5:
                f.seek(pos)
                if rng.random() < 0.5:
                    f.write(rng.randbytes(length))
                else:
                    text = b" ".join(rng.choice(words) for _ in range(length // 8))
                    f.write(text[:length].ljust(length, b"\n"))
                extents.append((pos, length))
            pos += length
    return extents


def change_image(path: Path, extents: list[tuple[int, int]], rng: random.Random) -> list[int]:
    """Change ~2 % of the image; return the dirty 64 KiB blocks (numbers)."""
    dirty: set[int] = set()
    with path.open("r+b") as f:
        for _ in range(70):  # clusters of 4 KiB writes inside data (~1 MiB written)
            start, length = rng.choice(extents)
            centre = start + rng.randrange(length)
            for _ in range(4):
                off = max(0, min(SIZE - 4096, centre + rng.randrange(-128 << 10, 128 << 10)))
                off = off // 4096 * 4096
                f.seek(off)
                f.write(rng.randbytes(4096))
                dirty.add(off // GRANULARITY)
        for _ in range(6):  # new files: 1 MiB contiguous writes (6 MiB)
            off = rng.randrange(0, SIZE - MiB) // 4096 * 4096
            f.seek(off)
            f.write(rng.randbytes(MiB))
            dirty.update(range(off // GRANULARITY, -(-(off + MiB) // GRANULARITY)))
    return sorted(dirty)


def pack_bytes(repo_dir: Path) -> int:
    return sum(p.stat().st_size for p in (repo_dir / "data").rglob("*") if p.is_file())


def run_one(
    work: Path, image: Path, changed: Path, dirty: list[int], chunk: int
) -> dict[str, float]:
    from stratavault.sources import RawDiskSource

    repo_dir = work / f"repo-{chunk >> 10}"
    shutil.rmtree(repo_dir, ignore_errors=True)
    storage = LocalStorage(repo_dir)
    out: dict[str, float] = {"chunk_kib": chunk >> 10}
    with Repository.init(storage, b"pw", cache_dir=None, kdf=KdfParams.fast()) as repo:
        opts = BackupDisksOptions(paths=("bench",), host="bench", chunk_bytes=chunk)
        t0 = time.perf_counter()
        with RawDiskSource(image, name="vda") as src:
            full = backup_disks(repo, [src], opts)
        out["full_s"] = round(time.perf_counter() - t0, 2)
        out["full_read_mib"] = round(full.summary.bytes_read / MiB, 1)
        out["full_repo_mib"] = round(pack_bytes(repo_dir) / MiB, 1)
        extents = [(b * GRANULARITY, GRANULARITY) for b in dirty]
        t0 = time.perf_counter()
        with RawDiskSource(changed, name="vda", changed=extents) as src:
            inc = backup_disks(repo, [src], opts)
        out["inc_s"] = round(time.perf_counter() - t0, 2)
        out["inc_read_mib"] = round(inc.summary.bytes_read / MiB, 1)
        out["inc_repo_growth_mib"] = round(pack_bytes(repo_dir) / MiB - out["full_repo_mib"], 1)
        segs = inc.disks[0].segments
        out["index_kib"] = round(sum(repo.chunk_info(s).raw_bytes for s in segs) / 1024, 1)
    # A fully allocated 1 TiB disk: 32 bytes of id + 1 bit per chunk in the disk index,
    # ~49 bytes per distinct chunk in the client's chunk index (docs/format.md).
    out["index_mib_per_tib"] = round(TiB // chunk * (32 + 1 / 8) / MiB, 1)
    out["client_index_mib_per_tib"] = round(TiB // chunk * 49 / MiB, 1)
    shutil.rmtree(repo_dir, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-kib", default="64,256,1024,4096")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=1)
    ns = parser.parse_args()
    work = ns.work or Path(tempfile.mkdtemp(prefix="sv-disk-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(ns.seed)
    image, changed = work / "base.img", work / "changed.img"
    extents = make_image(image, rng)
    shutil.copyfile(image, changed)
    dirty = change_image(changed, extents, rng)
    data = sum(n for _o, n in extents)
    print(
        f"image: {SIZE // MiB} MiB, data {data / MiB:.0f} MiB, "
        f"dirty {len(dirty) * GRANULARITY / MiB:.1f} MiB in 64 KiB blocks"
    )
    rows = [run_one(work, image, changed, dirty, int(k) << 10) for k in ns.sizes_kib.split(",")]
    for row in rows:
        print(json.dumps(row))
    if ns.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
