"""A real Linux guest (tests/guest, TCG) that keeps writing, backed up six times into a
repository: every snapshot restores to exactly the disks at its point in time."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from stratavault.jobs import (
    BackupDisksOptions,
    BackupVmOptions,
    NbdDiskSource,
    RestoreDiskOptions,
    backup_disks,
    backup_vm,
    restore_disk,
)
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import Snapshot, find_snapshot, load_snapshots
from stratavault.sources import QmpSession, VmBackup
from stratavault.storage import MemoryStorage
from tests.guest.fixtures import MakeGuest
from tests.sources import vm_harness

pytestmark = pytest.mark.infra("qemu")
short_tmp = vm_harness.short_tmp


def _snapshot_with_reference(
    repo: Repository, qmp: Path, scratch: Path, refs: Path, n: int
) -> tuple[Snapshot, dict[str, Path]]:
    """What backup_vm does, plus a full copy of each export at the same point in time."""
    parents = [s for s in load_snapshots(repo) if s.paths == ["guest"]]
    parent = parents[-1] if parents else None
    expected = {d.name: d.bitmap for d in parent.disks if d.bitmap} if parent else {}
    copies: dict[str, Path] = {}
    session = QmpSession(qmp, timeout_s=30)
    backup = VmBackup(session, scratch, expected_bitmaps=expected, freeze_timeout_s=60)
    with session, backup as vm:
        assert vm.consistency_text == "application-consistent (fs frozen)"
        for export in vm.exports:
            copies[export.device] = refs / f"{export.device}-{n}.raw"
            subprocess.run(
                ["qemu-img", "convert", "-O", "raw", export.uri, str(copies[export.device])],
                check=True,
            )
        sources = [NbdDiskSource(e) for e in vm.exports]
        options = BackupDisksOptions(
            host="h", paths=("guest",), kind="vm", parent=parent.id if parent else None,
            vm_config=vm.config,
        )  # fmt: skip
        try:
            snap = backup_disks(repo, sources, options)
        finally:
            for source in sources:
                source.close()
    return snap, copies


def test_six_snapshots_of_a_writing_guest_restore_exactly(
    make_guest: MakeGuest, short_tmp: Path
) -> None:
    repo = Repository.init(MemoryStorage(), b"pw", cache_dir=None, kdf=KdfParams.fast())
    vm = make_guest(append=["sv.writer=1", "sv.writer_interval=0.02"])
    vm.wait_for("stratavault-guest: writer started")
    scratch, refs = short_tmp / "s", short_tmp / "refs"
    refs.mkdir()
    taken: list[tuple[Snapshot, dict[str, Path]]] = []
    for n in range(5):
        taken.append(_snapshot_with_reference(repo, vm.qmp_path, scratch, refs, n))
        time.sleep(0.3)  # the writer goes on between backups
    # A sixth one through backup_vm itself continues the same chain.
    last = backup_vm(repo, BackupVmOptions(qmp_socket=vm.qmp_path, name="guest", host="h"))
    assert last.parent == taken[-1][0].id
    assert last.vm_config is not None and not any(last.vm_config["full_read"].values())
    assert last.summary.bytes_read < 8 << 20  # incremental: far less than the disks
    for snap, copies in taken:
        assert snap.summary.bytes_read <= (300 << 20)
        for disk, reference in copies.items():
            out = short_tmp / f"restored-{snap.short_id}-{disk}.raw"
            restore_disk(repo, find_snapshot(repo, snap.id), RestoreDiskOptions(out, disk=disk))
            same = subprocess.run(["cmp", "-s", str(out), str(reference)], check=False)
            assert same.returncode == 0, f"snapshot {snap.short_id} disk {disk} differs"
            out.unlink()
        data_disk = copies["vdb"]
        fsck = subprocess.run(["e2fsck", "-fn", str(data_disk)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout  # frozen: a clean file system each time
    assert taken[1][0].summary.bytes_read < taken[0][0].summary.bytes_read
