"""Disk images: backup, incremental from changed extents, restore (sparse, qcow2, changed-only),
check naming disk ranges, and disk and file snapshots side by side. Real files, real qemu-img."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stratavault._defaults import DEFAULT_DISK_FRAME_BYTES
from stratavault.errors import DataDamagedError, Interrupted, RestoreError, UsageError
from stratavault.jobs import (
    DEFAULT_DISK_CHUNK_BYTES,
    BackupDisksOptions,
    Cancellation,
    NullProgress,
    ProgressState,
    RestoreDiskOptions,
    _backup_disk,
    backup_disks,
    backup_images,
    chunk_runs,
    new_disk_chunk_bytes,
    read_groups,
    restore_disk,
)
from stratavault.nbd import connect
from stratavault.repo import Repository
from stratavault.snapshot import load_disk_index, load_snapshots
from stratavault.sources import RawDiskSource
from stratavault.storage import LocalStorage
from tests.e2e.conftest import Cli, Result
from tests.sockets import wait_for_socket

MiB = 1 << 20
CHUNK = DEFAULT_DISK_CHUNK_BYTES
SIZE = 256 * MiB


def _make_image(path: Path, seed: int = 7) -> list[tuple[int, int]]:
    """A sparse 256 MiB image: 20 random regions of 2 MiB at unaligned offsets (40 MiB of
    data), plus 8 MiB of allocated zeros. Returns the data regions."""
    rng = random.Random(seed)
    regions = [(n * 12 * MiB + rng.randrange(1, 4 * MiB), 2 * MiB) for n in range(20)]
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset, length in regions:
            f.seek(offset)
            f.write(rng.randbytes(length))
        f.seek(245 * MiB)
        f.write(bytes(8 * MiB))  # allocated, but zeros: must not be stored
    return regions


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _json_summary(result: Result) -> dict[str, Any]:
    lines = result.json_lines()
    return next(line for line in reversed(lines) if line.get("message_type") == "summary")


def _last_json(result: Result) -> Any:
    return json.loads(result.out.splitlines()[-1])


def _open(cli: Cli) -> Repository:
    return Repository.open(
        LocalStorage(cli.repo), cli.password_file.read_text().strip().encode(), cache_dir=None
    )


def _modify(path: Path, changes: list[tuple[int, int]]) -> None:
    with path.open("r+b") as f:
        for offset, length in changes:
            f.seek(offset)
            f.write(os.urandom(length))


def test_full_backup_restores_byte_identical_and_sparse(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    regions = _make_image(image)
    cli("init")
    backup = cli("backup", "image", image, "--json")
    assert backup.code == 0, backup.err
    summary = _json_summary(backup)
    # Zero chunks (holes and the allocated zeros) are neither stored nor counted.
    touched = {(o + i) // CHUNK for o, n in regions for i in (0, n - 1)}
    data_chunks = sum(1 + (o + n - 1) // CHUNK - o // CHUNK for o, n in regions)
    assert len(touched) <= data_chunks
    stats = _last_json(cli("stats", "--json"))
    assert stats["raw_bytes"] < data_chunks * CHUNK + 64 * 1024  # + the index segment
    assert summary["chunks_added"] == data_chunks
    target = tmp_path / "restored.img"
    restore = cli("restore", "disk", "latest", "--to", target, "--verify", "--json")
    assert restore.code == 0, restore.err
    assert _json_summary(restore)["chunks_verified"] == SIZE // CHUNK
    assert target.read_bytes() == image.read_bytes()
    # Holes kept, at 4 KiB: the same blocks as the image, without its 8 MiB of written zeros.
    assert abs(_allocated(target) - (_allocated(image) - 8 * MiB)) <= 64 << 10
    listing = [json.loads(line) for line in cli("ls", "latest", "--json").out.splitlines()]
    assert listing[0]["name"] == "disk.img" and listing[0]["size"] == SIZE
    assert listing[0]["data_chunks"] == data_chunks
    assert cli("check", "--read-data").code == 0


def test_incremental_from_changed_extents_stores_only_changed_chunks(
    cli: Cli, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    _make_image(image)
    original = image.read_bytes()
    cli("init")
    assert cli("backup", "image", image, "-q").code == 0
    # Three changes: inside one chunk, across a chunk boundary, and in a former hole.
    changes = [(5 * CHUNK + 1000, 4096), (40 * CHUNK - 100, 200), (900 * CHUNK + 10, 50_000)]
    _modify(image, changes)
    # A synthetic dirty bitmap at 64 KiB granularity, as QEMU would report it.
    gran = 64 << 10
    dirty = [(o // gran * gran, -(-(o + n) // gran) * gran - o // gran * gran) for o, n in changes]
    with _open(cli) as repo, RawDiskSource(image, changed=dirty) as source:
        options = BackupDisksOptions(paths=(str(image.absolute()),))
        snap = backup_disks(repo, [source], options)
        assert snap.parent is not None
        assert snap.summary.chunks_added == 4  # chunks 5, 39, 40, 900
        assert snap.summary.bytes_read == 4 * CHUNK
        index = load_disk_index(repo, snap.disks[0])
        assert index.chunk_count == SIZE // CHUNK
    target = tmp_path / "inc.img"
    assert cli("restore", "disk", snap.id, "--to", target).code == 0
    assert target.read_bytes() == image.read_bytes()
    older = tmp_path / "first.img"
    assert cli("restore", "disk", snap.parent, "--to", older).code == 0
    assert older.read_bytes() == original


def test_changed_only_restore_writes_only_differing_chunks(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    regions = _make_image(image)
    original = image.read_bytes()
    cli("init")
    assert cli("backup", "image", image, "-q").code == 0
    # Some chunks changed: data to other data, zeros to data, data to zeros.
    _modify(image, [(3 * CHUNK + 5, 10), (100 * CHUNK, CHUNK), (1000 * CHUNK + 1, 1)])
    with image.open("r+b") as f:
        f.seek(regions[3][0])
        f.write(bytes(CHUNK))  # zeros over data
        f.seek(regions[5][0] + CHUNK)
        f.write(os.urandom(100))  # data over other data
    modified = image.read_bytes()
    differ = [
        n
        for n in range(SIZE // CHUNK)
        if original[n * CHUNK : (n + 1) * CHUNK] != modified[n * CHUNK : (n + 1) * CHUNK]
    ]
    zero = [n for n in differ if original[n * CHUNK : (n + 1) * CHUNK] == bytes(CHUNK)]
    assert len(differ) >= 4 and zero and len(zero) < len(differ)
    result = cli("restore", "disk", "latest", "--onto", image, "--changed-only", "--json")
    assert result.code == 0, result.err
    summary = _json_summary(result)
    # Only the image's data regions are read and hashed (its holes read as zeros).
    assert 40 * MiB < summary["bytes_read"] < 64 * MiB
    assert summary["chunks_written"] == len(differ) - len(zero)
    assert summary["bytes_written"] == (len(differ) - len(zero)) * CHUNK
    assert summary["chunks_zeroed"] == len(zero)
    assert summary["chunks_unchanged"] == SIZE // CHUNK - len(differ)
    assert image.read_bytes() == original
    # Nothing differs any more: a second run writes nothing.
    again = _json_summary(
        cli("restore", "disk", "latest", "--onto", image, "--changed-only", "--json")
    )
    assert again["bytes_written"] == 0 and again["chunks_zeroed"] == 0


@pytest.mark.infra("qemu")
def test_restore_to_qcow2_equals_the_image(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _make_image(image)
    cli("init")
    assert cli("backup", "image", image, "-q").code == 0
    target = tmp_path / "out.qcow2"
    result = cli("restore", "disk", "latest", "--to", target, "--format", "qcow2", "--verify")
    assert result.code == 0, result.err
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert not list(tmp_path.glob(".out.qcow2*"))  # the raw temporary is gone


def test_check_names_the_disk_range_of_a_damaged_chunk(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _make_image(image)
    cli("init")
    assert cli("backup", "image", image, "-q").code == 0
    pack = max((p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=os.path.getsize)
    data = bytearray(pack.read_bytes())
    data[1000] ^= 0x01  # inside the first blob of the pack
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    result = cli("check", "--read-data", "--json")
    assert result.code == DataDamagedError.exit_code
    damages = _last_json(result)["damages"]
    per_frame = DEFAULT_DISK_FRAME_BYTES // CHUNK
    assert 1 <= len(damages) <= per_frame  # the members of the damaged frame (neighbours)
    assert len({d["object"] for d in damages}) == 1
    ranges = []
    for damage in damages:
        (where,) = damage["paths"]
        assert where.startswith("disk disk.img bytes ")
        ranges.append(tuple(int(x) for x in where.rsplit(" ", 1)[1].split("-")))
    ranges.sort()
    assert all(end - start == CHUNK and start % CHUNK == 0 for start, end in ranges)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_disk_and_file_snapshots_coexist(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _make_image(image)
    src = tmp_path / "files"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(500_000))
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    assert cli("backup", "image", image, "--name", "vda", "--tag", "nightly", "-q").code == 0
    snaps = _last_json(cli("snapshots", "--json"))
    assert [s["kind"] for s in snaps] == ["files", "image"]
    files_id, disk_id = (s["id"] for s in snaps)
    assert cli("restore", files_id, "--target", tmp_path / "t").code == 0
    assert (tmp_path / "t" / str(src).lstrip("/") / "a.bin").read_bytes() == (
        src / "a.bin"
    ).read_bytes()
    assert cli("restore", "disk", f"{disk_id}:vda", "--to", tmp_path / "d.img").code == 0
    assert (tmp_path / "d.img").read_bytes() == image.read_bytes()
    assert cli("ls", disk_id).out.splitlines()[-1].split()[0] == "vda"
    stats = _last_json(cli("stats", disk_id, "--json"))
    assert stats["snapshot"]["disks"][0]["size"] == SIZE
    assert cli("check", "--read-data").code == 0
    # Usage mistakes are usage errors.
    assert cli("restore", "disk", files_id, "--to", tmp_path / "x.img").code == UsageError.exit_code
    assert cli("restore", disk_id).code == UsageError.exit_code  # files need --target
    wrong = cli("restore", disk_id, "--target", tmp_path / "t2")
    assert wrong.code == UsageError.exit_code and "restore disk" in wrong.err
    assert cli("restore", "disk", disk_id, "--to", tmp_path / "d.img").code == 1  # exists
    assert cli("restore", "disk", disk_id, "--changed-only", "--to", tmp_path / "y").code == 2


@pytest.fixture
def loop_devices(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Attach files as loop block devices (root only); detached at the end."""
    attached: list[str] = []

    def attach(backing: Path) -> Path:
        if os.geteuid() != 0:
            pytest.skip("loop devices need root")
        proc = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            pytest.skip(f"losetup failed: {proc.stderr.strip()}")
        attached.append(proc.stdout.strip())
        return Path(attached[-1])

    yield attach
    for device in attached:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.mark.infra("root")
def test_block_device_backup_and_restore(
    cli: Cli, tmp_path: Path, loop_devices: Callable[[Path], Path]
) -> None:
    image = tmp_path / "disk.img"
    regions = _make_image(image)
    source = loop_devices(image)
    cli("init")
    backup = cli("backup", "image", source, "--name", "vdb", "--json")
    assert backup.code == 0, backup.err
    assert _json_summary(backup)["bytes_read"] == SIZE  # a device has no holes to skip
    # Restore onto another device full of old data: zero chunks must be written as zeros.
    other = tmp_path / "other.img"
    other.write_bytes(b"\xa5" * SIZE)
    target = loop_devices(other)
    result = cli("restore", "disk", "latest", "--to", target, "--verify", "--json")
    assert result.code == 0, result.err
    assert _json_summary(result)["chunks_zeroed"] > 0
    assert target.read_bytes() == image.read_bytes()
    # Changed-only onto the device: one changed chunk is written back.
    with target.open("r+b") as f:
        f.seek(regions[2][0])
        f.write(b"\x00garbage")
    again = cli("restore", "disk", "latest", "--onto", target, "--changed-only", "--json")
    assert again.code == 0, again.err
    assert _json_summary(again)["chunks_written"] == 1
    assert target.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("read_chunks", [1, 4])  # 4: the pieces read are stored as frames
def test_cancelled_backup_writes_no_snapshot_and_keeps_its_chunks(
    cli: Cli, tmp_path: Path, read_chunks: int
) -> None:
    image = tmp_path / "disk.img"
    _make_image(image)
    cli("init")
    cancel = Cancellation()

    class CancelsMidway(RawDiskSource):
        """The real image; Ctrl-C arrives after some reads."""

        reads = 0

        def read(self, offset: int, length: int) -> bytes:
            self.reads += 1
            if self.reads == 4:
                cancel.cancel()
            return super().read(offset, length)

    with _open(cli) as repo, CancelsMidway(image) as source:
        options = BackupDisksOptions(paths=(str(image),), read_bytes=read_chunks * CHUNK)
        with pytest.raises(Interrupted):
            backup_disks(repo, [source], options, cancel=cancel)
        assert list(repo.list_snapshots()) == []
        kept = repo.stats().chunks
        assert kept >= 3
    backup = cli("backup", "image", image, "--json")
    assert backup.code == 0, backup.err
    summary = _json_summary(backup)
    listing = json.loads(cli("ls", "latest", "--json").out.splitlines()[0])
    assert summary["chunks_added"] == listing["data_chunks"] - kept  # the rest was reused
    assert cli("check", "--read-data").code == 0


@pytest.mark.parametrize("frame_kib", ["0", "1024"])
def test_prune_keeps_what_disk_snapshots_use(cli: Cli, tmp_path: Path, frame_kib: str) -> None:
    image = tmp_path / "disk.img"
    regions = _make_image(image)
    cli("init")
    assert cli("backup", "image", image, "-q", "--frame-size", frame_kib).code == 0
    first = _last_json(cli("snapshots", "--json"))[0]["id"]
    original = image.read_bytes()
    _modify(image, [(regions[0][0], 3 * CHUNK), (regions[9][0] + 7, 100)])
    modified = image.read_bytes()
    gone = sum(  # data chunks of the first snapshot that the second does not have
        1
        for n in range(SIZE // CHUNK)
        if original[n * CHUNK : (n + 1) * CHUNK]
        not in (bytes(CHUNK), modified[n * CHUNK : (n + 1) * CHUNK])
    )
    assert gone >= 4
    assert cli("backup", "image", image, "-q", "--frame-size", frame_kib).code == 0
    assert cli("forget", first).code == 0
    before = _last_json(cli("stats", "--json"))["chunks"]
    pruned = cli("prune", "--max-unused", "0%")
    assert pruned.code == 0, pruned.err
    # The first snapshot's own chunks and its index segment went; everything else stayed
    # (the live chunks of a frame that also held dead ones went into a new frame).
    assert _last_json(cli("stats", "--json"))["chunks"] == before - gone - 1
    target = tmp_path / "after-prune.img"
    assert cli("restore", "disk", "latest", "--to", target).code == 0
    assert target.read_bytes() == image.read_bytes()
    assert cli("check", "--read-data").code == 0


@pytest.mark.parametrize("new_size", [10 * MiB + 300_000, 9 * MiB + 5])
def test_resized_disk_with_a_short_last_chunk(cli: Cli, tmp_path: Path, new_size: int) -> None:
    """A disk that is not a whole number of chunks, grown or shrunk between two backups;
    the second backup knows only the changed extents (as from a dirty bitmap)."""
    image = tmp_path / "odd.img"
    image.write_bytes(os.urandom(10 * MiB + 12345))
    cli("init")
    assert cli("backup", "image", image, "-q").code == 0
    with image.open("r+b") as f:
        f.truncate(new_size)
        f.seek(new_size - 1000)
        f.write(os.urandom(1000))
    changed = [(new_size - 1000, 1000)]
    with _open(cli) as repo, RawDiskSource(image, changed=changed) as source:
        snap = backup_disks(repo, [source], BackupDisksOptions(paths=(str(image),)))
        assert snap.disks[0].size_bytes == new_size
        # From the old short last chunk to the end (that and the change), nothing before.
        whole = min(new_size, 10 * MiB + 12345) // CHUNK * CHUNK
        assert snap.summary.bytes_read <= new_size - whole + CHUNK
    target = tmp_path / "out.img"
    assert cli("restore", "disk", "latest", "--to", target, "--verify").code == 0
    assert target.read_bytes() == image.read_bytes()


def test_read_groups_bound_chunks_and_runs_per_task() -> None:
    runs = [(0, 3), (10, 1), (20, 9), (40, 1), (50, 1), (60, 1)]
    groups = list(read_groups(runs, 4, max_runs=2))
    assert groups == [
        [(0, 3), (10, 1)],
        [(20, 4)],
        [(24, 4)],
        [(28, 1), (40, 1)],
        [(50, 1), (60, 1)],
    ]
    assert [r for g in read_groups(runs, 4) for r in g] == [r for g in groups for r in g]
    assert all(sum(n for _, n in g) <= 4 for g in read_groups(runs, 4))


def test_chunk_runs_merge_and_clip() -> None:
    chunk = 256 << 10
    extents = [(0, 1), (100, 200_000), (chunk, 1), (5 * chunk - 1, 2)]
    assert list(chunk_runs(extents, SIZE, chunk)) == [(0, 2), (4, 2)]  # adjacent: one run
    assert list(chunk_runs([(SIZE - 1, 10), (SIZE + 5, 10), (7, 0)], SIZE, chunk)) == [
        (SIZE // chunk - 1, 1)
    ]


def test_damaged_disk_index_is_named_and_restore_fails_cleanly(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _make_image(image)
    cli("init")
    assert cli("backup", "image", image, "--name", "vda", "-q").code == 0
    trees = min((p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=os.path.getsize)
    data = bytearray(trees.read_bytes())
    data[100] ^= 0x01  # the index segment: the only blob of the smallest pack
    trees.chmod(0o644)
    trees.write_bytes(bytes(data))
    result = cli("check", "--json")
    assert result.code == DataDamagedError.exit_code
    (damage,) = _last_json(result)["damages"]
    assert damage["object"] == "disk index of vda" and damage["paths"] == ["disk vda"]
    target = tmp_path / "out.img"
    restore = cli("restore", "disk", "latest", "--to", target)
    assert restore.code == DataDamagedError.exit_code and "disk vda" in restore.err
    assert not target.exists()


def test_image_written_during_backup_gives_an_incomplete_snapshot(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _make_image(image)
    cli("init")

    class WrittenWhileRead(RawDiskSource):
        """The real image; something (a running VM) writes to it during the backup."""

        writes = 1

        def read(self, offset: int, length: int) -> bytes:
            if self.writes:
                self.writes -= 1
                with image.open("r+b") as f:
                    f.seek(100 * MiB)
                    f.write(b"guest write")
            return super().read(offset, length)

    with _open(cli) as repo, WrittenWhileRead(image, name="vda") as source:
        snap = backup_disks(repo, [source], BackupDisksOptions(paths=(str(image),)))
    assert snap.incomplete and snap.errors[0].path == "vda"
    assert "changed while it was read" in snap.errors[0].error


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Serve an image with qemu-nbd (several connections); stopped at the end."""
    servers: list[subprocess.Popen[bytes]] = []

    def serve(image: Path) -> str:
        sock = tmp_path / f"nbd{len(servers)}.sock"
        proc = subprocess.Popen(
            ["qemu-nbd", "--socket", str(sock), "--format", "qcow2", "--shared", "8",
             "--persistent", "--cache=writeback", str(image)],
        )  # fmt: skip
        servers.append(proc)
        wait_for_socket(sock, proc)
        return f"nbd+unix:///?socket={sock}"

    yield serve
    for proc in servers:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.infra("qemu")
def test_restore_to_an_nbd_export(
    cli: Cli, tmp_path: Path, qemu_nbd: Callable[[Path], str]
) -> None:
    image = tmp_path / "disk.img"
    regions = _make_image(image)
    cli("init")
    assert cli("backup", "image", image, "-q").code == 0
    qcow2 = tmp_path / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(SIZE)], check=True)
    uri = qemu_nbd(qcow2)
    result = cli("restore", "disk", "latest", "--to", uri, "--verify", "--json")
    assert result.code == 0, result.err
    summary = _json_summary(result)
    assert summary["chunks_verified"] == SIZE // CHUNK and summary["issues"] == []
    # Damage a chunk through NBD, then write back only what differs.
    with connect(uri) as client:
        client.write(regions[4][0] + 10, b"damage")
    again = cli("restore", "disk", "latest", "--onto", uri, "--changed-only", "--json")
    assert again.code == 0, again.err
    summary = _json_summary(again)
    assert summary["chunks_written"] == 1 and summary["chunks_zeroed"] == 0
    assert summary["bytes_read"] < 64 * MiB  # only the export's allocated data was read
    compare = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(image), str(qcow2)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_interrupted_restore_removes_the_new_file(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    _make_image(image)
    cli("init")
    assert cli("backup", "image", image, "-q").code == 0

    class StopAfterFirstWrite(NullProgress):
        def update(self, state: ProgressState) -> None:
            if state.bytes_done:
                cancel.cancel()

    cancel = Cancellation()
    target = tmp_path / "new.img"
    with _open(cli) as repo:
        snap = load_snapshots(repo)[-1]
        with pytest.raises(Interrupted):
            restore_disk(
                repo,
                snap,
                RestoreDiskOptions(target=target, workers=1),
                progress=StopAfterFirstWrite(),
                cancel=cancel,
            )
    assert not target.exists()


def test_parent_found_by_disk_names_when_no_paths_are_given(cli: Cli, tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    image.write_bytes(os.urandom(4 * MiB))
    cli("init")
    with _open(cli) as repo:
        with RawDiskSource(image, name="sda") as source:
            first = backup_disks(repo, [source], BackupDisksOptions())
        _modify(image, [(MiB, 10)])
        with RawDiskSource(image, name="sda", changed=[(MiB, 10)]) as source:
            second = backup_disks(repo, [source], BackupDisksOptions())
    assert first.paths == second.paths == ["sda"]
    assert second.parent == first.id and second.summary.chunks_added == 1


def test_large_disks_get_larger_chunks_so_their_index_stays_bounded(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert new_disk_chunk_bytes(256 << 30, CHUNK) == CHUNK  # 4 Mi chunks: the bound
    assert new_disk_chunk_bytes((256 << 30) + 1, CHUNK) == 2 * CHUNK
    assert new_disk_chunk_bytes(4 << 40, CHUNK) == 1 << 20
    assert new_disk_chunk_bytes(1 << 60, CHUNK) == 64 << 20  # no larger than that
    # End to end with a lower bound: a 256 MiB disk of at most 1,024 chunks.
    monkeypatch.setattr(_backup_disk, "MAX_DISK_CHUNKS", 1024)
    image = tmp_path / "disk.img"
    _make_image(image)
    cli("init")
    with _open(cli) as repo, RawDiskSource(image) as source:
        snap = backup_disks(repo, [source], BackupDisksOptions(paths=(str(image),)))
    assert snap.disks[0].chunk_bytes == SIZE // 1024
    target = tmp_path / "out.img"
    assert cli("restore", "disk", "latest", "--to", target).code == 0
    assert target.read_bytes() == image.read_bytes()


def test_format_option_keeps_a_raw_disk_that_looks_like_qcow2_raw(cli: Cli, tmp_path: Path) -> None:
    """A guest can write a qcow2 header whose backing file is a host path into its raw
    disk: probed, the backup would read that host file. ``--format raw`` reads the disk."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"host secret " * 100_000)
    guest = tmp_path / "guest.raw"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(guest)],
        check=True,
    )
    with guest.open("ab") as f:  # the rest of the guest's disk
        f.write(os.urandom(3 * CHUNK))
    cli("init")
    assert cli("backup", "image", guest, "--format", "raw", "-q").code == 0
    kept = tmp_path / "kept.raw"
    assert cli("restore", "disk", "latest", "--to", kept).code == 0
    assert kept.read_bytes() == guest.read_bytes()
    # Probed, it reads as a qcow2 naming the host file: refused, the message says what to do.
    probed = cli("backup", "image", guest, "-q")
    assert probed.code == UsageError.exit_code
    assert str(secret) in probed.err and "--format raw" in probed.err
    # Said to be a qcow2, it is one: read through its backing file, as asked.
    assert cli("backup", "image", guest, "--format", "qcow2", "-q").code == 0
    chained = tmp_path / "chained.raw"
    assert cli("restore", "disk", "latest", "--to", chained).code == 0
    assert chained.read_bytes()[:12] == b"host secret "
    with _open(cli) as repo, pytest.raises(UsageError, match="image format 'iso'"):
        backup_images(repo, [guest], BackupDisksOptions(), image_format="iso")


@pytest.mark.parametrize("kind", ["vmdk", "qcow2"])
def test_restore_onto_an_image_naming_other_files_is_refused(
    cli: Cli, tmp_path: Path, kind: str
) -> None:
    """A vmdk descriptor names the files it is made of, a qcow2 header an external data
    file (a guest can write either into its raw disk): restoring onto it would write them.
    Refused, and they stay as they were."""
    image = tmp_path / "disk.img"
    _make_image(image)
    cli("init")
    assert cli("backup", "image", image, "-q").code == 0
    if kind == "vmdk":
        split, extent = tmp_path / "split.vmdk", tmp_path / "split-flat.vmdk"
        options = "subformat=monolithicFlat"
    else:
        split, extent = tmp_path / "split.qcow2", tmp_path / "data.raw"
        options = f"data_file={extent}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", kind, "-o", options, str(split), str(SIZE)],
        check=True,
    )
    before = extent.stat().st_mtime_ns, extent.stat().st_size
    result = cli("restore", "disk", "latest", "--onto", split)
    assert result.code == RestoreError.exit_code
    assert str(extent) in result.err and "would change those files" in result.err
    assert (extent.stat().st_mtime_ns, extent.stat().st_size) == before
