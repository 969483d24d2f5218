"""Live VM backup end to end: a real QEMU VM (OS-less, KVM when usable) whose disks are
written through their devices, backed up incrementally into a repository, restored and
compared with reference images; stopped images of other formats through NBD."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from stratavault.errors import Interrupted
from stratavault.jobs import (
    BackupDisksOptions,
    BackupVmOptions,
    Cancellation,
    RestoreDiskOptions,
    RestoreVmOptions,
    backup_images,
    backup_vm,
    disk_files,
    restore_disk,
    restore_vm,
    vm_command,
    without_network,
)
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import Snapshot
from stratavault.sources import QmpSession
from stratavault.storage import MemoryStorage
from tests.e2e.conftest import Cli
from tests.sockets import wait_for_socket
from tests.sources import vm_harness
from tests.sources.vm_harness import KiB, MiB, Vm, plain, reference_image


def image_bitmaps(image: Path) -> list[str]:
    """The persistent bitmaps stored in a qcow2 image."""
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(image)],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


pytestmark = pytest.mark.infra("qemu")
make_vm = vm_harness.make_vm
short_tmp = vm_harness.short_tmp


def guest_writes(vm: Vm, device: str, writes: list[tuple[int, int, int]]) -> None:
    """Writes through the device, on a QMP connection of their own: QEMU serves one client
    per monitor, and the backup needs it."""
    session = vm.connect()
    try:
        for pattern, offset, length in writes:
            vm.write(session, device, pattern, offset, length)
        vm.hmp_io(session, device, "flush")  # as a guest's fsync: survives a QEMU crash
    finally:
        session.close()
        vm.sessions.remove(session)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(
        MemoryStorage(), b"pw", cache_dir=tmp_path / "cache", kdf=KdfParams.fast()
    )


def start(vm: Vm) -> None:
    """Start the VM and leave its monitor free for the backup."""
    session = vm.start()
    session.close()
    vm.sessions.remove(session)


def restored_equals(repo: Repository, snap: Snapshot, disk: str, ref: Path, tmp: Path) -> bool:
    out = tmp / f"{snap.id[:8]}-{disk}.raw"
    restore_disk(repo, snap, RestoreDiskOptions(target=out, disk=disk))
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(out), str(ref)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    out.unlink()
    return result.returncode == 0


def test_incremental_forever_backups_of_a_running_vm(
    repo: Repository, make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64, 32))
    start(vm)
    writes_a = [(0x11, 0, 1 * MiB), (0x12, 40 * MiB, 3 * MiB)]
    writes_b = [(0x21, 8 * MiB, 512 * KiB)]
    guest_writes(vm, "vda", writes_a)
    guest_writes(vm, "vdb", writes_b)
    opts = BackupVmOptions(qmp_socket=vm.qmp_path, name="web1", host="h")
    first = backup_vm(repo, opts)
    assert first.kind == "vm" and first.paths == ["web1"]
    assert {d.name: plain(d.bitmap) for d in first.disks} == {
        "vda": "stratavault-1",
        "vdb": "stratavault-1",
    }
    assert all(re.fullmatch(r"stratavault-1-[0-9a-f]{12}", str(d.bitmap)) for d in first.disks)
    assert len({d.bitmap for d in first.disks}) == 2  # each disk's chain has its own token
    assert first.vm_config is not None and "crash-consistent" in first.vm_config["consistency"]
    assert first.vm_config["argv"][0] == "qemu-system-x86_64"

    more = [(0x13, 2 * MiB, 64 * KiB), (0x14, 60 * MiB, 128 * KiB)]
    guest_writes(vm, "vda", more)
    second = backup_vm(repo, opts)
    assert second.parent == first.id
    # Only the two dirty regions were read (64 KiB and 128 KiB: whole 64 KiB chunks).
    assert second.summary.bytes_read == 3 * 64 * KiB
    assert {d.name: plain(d.bitmap) for d in second.disks} == {
        "vda": "stratavault-2",
        "vdb": "stratavault-2",
    }

    ref_a1 = reference_image(short_tmp / "a1.qcow2", 64 * MiB, writes_a)
    ref_a2 = reference_image(short_tmp / "a2.qcow2", 64 * MiB, writes_a + more)
    ref_b = reference_image(short_tmp / "b.qcow2", 32 * MiB, writes_b)
    assert restored_equals(repo, first, "vda", ref_a1, short_tmp)
    assert restored_equals(repo, second, "vda", ref_a2, short_tmp)
    assert restored_equals(repo, second, "vdb", ref_b, short_tmp)

    # QEMU dies without storing its bitmaps: the next backup notices and reads everything.
    vm.kill()
    start(vm)
    guest_writes(vm, "vdb", [(0x22, 0, 64 * KiB)])
    third = backup_vm(repo, opts)
    assert third.vm_config is not None
    assert all(third.vm_config["full_read"].values()), third.vm_config["full_read"]
    ref_b3 = reference_image(short_tmp / "b3.qcow2", 32 * MiB, [*writes_b, (0x22, 0, 64 * KiB)])
    assert restored_equals(repo, third, "vda", ref_a2, short_tmp)
    assert restored_equals(repo, third, "vdb", ref_b3, short_tmp)


class _CancelWhenReading(Cancellation):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def check(self) -> None:
        self.calls += 1
        if self.calls == 3:
            self.cancel()
        super().check()


def test_a_failed_backup_loses_no_change(
    repo: Repository, make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((32,))
    start(vm)
    opts = BackupVmOptions(qmp_socket=vm.qmp_path, name="db", host="h")
    backup_vm(repo, opts)
    guest_writes(vm, "vda", [(0x31, 4 * MiB, 1 * MiB)])
    with pytest.raises(Interrupted):
        backup_vm(repo, opts, cancel=_CancelWhenReading())
    guest_writes(vm, "vda", [(0x32, 20 * MiB, 64 * KiB)])
    after = backup_vm(repo, opts)
    ref = reference_image(
        short_tmp / "r.qcow2", 32 * MiB, [(0x31, 4 * MiB, 1 * MiB), (0x32, 20 * MiB, 64 * KiB)]
    )
    assert restored_equals(repo, after, "vda", ref, short_tmp)
    assert after.summary.bytes_read <= 2 * MiB  # still incremental: the chain survived


def test_stopped_images_of_other_formats(repo: Repository, short_tmp: Path) -> None:
    qcow = short_tmp / "disk.qcow2"
    reference_image(qcow, 16 * MiB, [(0x41, 1 * MiB, 2 * MiB)])
    vmdk = short_tmp / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(qcow), str(vmdk)], check=True)
    opts = BackupDisksOptions(host="h")
    first = backup_images(repo, [qcow, vmdk], opts)
    assert sorted(d.name for d in first.disks) == ["disk.qcow2", "disk.vmdk"]
    qdisk = next(d for d in first.disks if d.name == "disk.qcow2")
    assert qdisk.bitmap  # a qcow2 gets a persistent bitmap chain
    assert restored_equals(repo, first, "disk.vmdk", qcow, short_tmp)

    subprocess.run(
        ["qemu-io", "-c", "write -P 0x42 12M 64k", str(qcow)], check=True, capture_output=True
    )
    second = backup_images(repo, [qcow, vmdk], opts)
    assert second.parent == first.id
    ref = reference_image(
        short_tmp / "q2.qcow2", 16 * MiB, [(0x41, 1 * MiB, 2 * MiB), (0x42, 12 * MiB, 64 * KiB)]
    )
    assert restored_equals(repo, second, "disk.qcow2", ref, short_tmp)
    # The qcow2 was read only where its bitmap says; the vmdk (no bitmap) whole again.
    assert second.summary.bytes_read <= 64 * KiB + 2 * MiB + 64 * KiB


def test_restore_vm_starts_a_copy_under_a_new_name(
    repo: Repository, make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((32, 16))
    start(vm)
    guest_writes(vm, "vda", [(0x51, 3 * MiB, 1 * MiB)])
    guest_writes(vm, "vdb", [(0x52, 0, 64 * KiB)])
    snap = backup_vm(repo, BackupVmOptions(qmp_socket=vm.qmp_path, name="app", host="h"))
    target = short_tmp / "restored"
    result = restore_vm(repo, snap, RestoreVmOptions(target_dir=target, start=True, name="app2"))
    assert result.pid is not None and result.qmp_socket is not None
    try:
        assert sorted(p.name for p in result.disks.values()) == ["vda.qcow2", "vdb.qcow2"]
        assert json.loads((target / "vm.json").read_text())["argv"] == snap.vm_config["argv"]  # type: ignore[index]
        with QmpSession(result.qmp_socket) as session:
            assert session.execute("query-name")["name"] == "app2"
            files = {
                b["device"] or b["qdev"]: b["inserted"]["file"]
                for b in session.execute("query-block")
            }
            assert all(str(target) in f for f in files.values()), files
            copy = Vm(target, list(result.disks.values()))
            copy.hmp_io(session, "vda", "read -P 0x51 3M 1M")
            copy.hmp_io(session, "vdb", "read -P 0x52 0 64k")
    finally:
        os.kill(result.pid, signal.SIGKILL)
    # The original VM was not touched: its disks are where they were, it still runs.
    assert vm.process is not None and vm.process.poll() is None


def test_vm_command_rewrites_disks_sockets_and_name(tmp_path: Path) -> None:
    config = {
        "argv": [
            "qemu-system-x86_64", "-name", "guest=old,debug-threads=on", "-daemonize",
            "-pidfile", "/run/old.pid", "-qmp", "unix:/run/old/vm.qmp,server=on,wait=off",
            "-chardev", "socket,id=qga0,path=/run/old/qga.sock,server=on,wait=off",
            "-serial", "file:/var/log/old-serial.log",
            "-blockdev", '{"driver":"file","filename":"/images/a.qcow2","node-name":"f0"}',
            "-drive", "file=/images/b.raw,format=raw,if=virtio",
        ],
        "disks": [
            {"device": "vda", "filename": "/images/a.qcow2", "format": "qcow2"},
            {"device": "vdb", "filename": "/images/b.raw", "format": "raw"},
        ],
    }  # fmt: skip
    disks = {"vda": tmp_path / "a.qcow2", "vdb": tmp_path / "b.raw"}
    argv = vm_command(config, disks, "new", tmp_path)
    text = " ".join(argv)
    assert "/images/" not in text and "/run/" not in text and "/var/log" not in text
    assert "-daemonize" not in argv and "-pidfile" not in argv
    assert argv[argv.index("-name") + 1] == "new"
    assert f"file={tmp_path}/b.raw" in text and f'"filename":"{tmp_path}/a.qcow2"' in text
    assert f"path={tmp_path}/qga.sock" in text and f"file:{tmp_path}/old-serial.log" in text
    assert argv[-2:] == ["-qmp", f"unix:{tmp_path}/qmp.sock,server=on,wait=off"]
    with_nic = [*argv, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    isolated = without_network(with_nic)
    assert "-netdev" not in isolated and "virtio-net-pci,netdev=n0" not in isolated
    assert isolated[-2:] == ["-nic", "none"] and "-blockdev" in isolated
    # Restored in another format: the command line opens each disk in its new format
    files = disk_files(tmp_path, {"vda": "raw", "vdb": "qcow2"})
    assert files == {"vda": tmp_path / "vda.raw", "vdb": tmp_path / "vdb.qcow2"}
    converted = vm_command(config, files, "new", tmp_path, {"vda": "raw", "vdb": "qcow2"})
    assert f"file={tmp_path}/vdb.qcow2,format=qcow2,if=virtio" in converted
    assert f'"driver":"file","filename":"{tmp_path}/vda.raw"' in " ".join(converted)
    same_stem = disk_files(tmp_path, {"a.qcow2": "raw", "a.raw": "raw", "a": "raw"})
    assert sorted(p.name for p in same_stem.values()) == ["a-2.raw", "a-3.raw", "a.raw"]


def test_backup_vm_and_restore_vm_from_the_command_line(
    cli: Cli, make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((32,))
    start(vm)
    guest_writes(vm, "vda", [(0x61, 1 * MiB, 256 * KiB)])
    assert cli("init").code == 0
    res = cli("backup", "vm", "--qmp", vm.qmp_path, "--name", "cli-vm", "--json")
    assert res.code == 0, res.err
    summary = res.json_lines()[-1]
    assert summary["message_type"] == "summary"
    assert [plain(str(d["bitmap"])) for d in summary["disks"]] == ["stratavault-1"]  # type: ignore[attr-defined]
    guest_writes(vm, "vda", [(0x62, 9 * MiB, 64 * KiB)])
    res = cli("backup", "vm", "--qmp", vm.qmp_path, "--name", "cli-vm")
    assert res.code == 0 and "crash-consistent" in res.out, res.out + res.err
    assert cli("check", "--read-data").code == 0
    target = short_tmp / "cli-restore"
    res = cli("restore", "vm", "latest", "--to", target, "--json")
    assert res.code == 0, res.err
    doc = res.json_lines()[-1]
    assert doc["command"] and Path(str(doc["config"])).is_file()
    ref = reference_image(
        short_tmp / "c.qcow2", 32 * MiB, [(0x61, 1 * MiB, 256 * KiB), (0x62, 9 * MiB, 64 * KiB)]
    )
    restored = Path(str(doc["disks"]["vda"]))  # type: ignore[index]
    cmp = subprocess.run(["qemu-img", "compare", str(restored), str(ref)], check=False)
    assert cmp.returncode == 0
    bad = cli("restore", "vm", "latest", "--target", target)
    assert bad.code == 2 and "--to DIR" in bad.err


def test_changed_only_restore_onto_a_stopped_qcow2_uses_its_bitmap(
    cli: Cli, short_tmp: Path
) -> None:
    disk = short_tmp / "vm.qcow2"
    original = [(0x71, 0, 4 * MiB), (0x72, 20 * MiB, 1 * MiB)]
    reference_image(disk, 32 * MiB, original)
    assert cli("init").code == 0
    assert cli("backup", "image", disk, "-q").code == 0  # creates the bitmap chain
    # The VM ran on after the backup: 2 regions rewritten (the bitmap records them).
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x99 1M 64k", "-c", "write -P 0x98 28M 512k", str(disk)],
        check=True, capture_output=True,
    )  # fmt: skip
    res = cli("restore", "disk", "latest", "--onto", disk, "--changed-only", "--verify", "--json")
    assert res.code == 0, res.err  # --verify reads the disk back, not the bitmap
    doc = res.json_lines()[-1]
    assert doc["bitmap_used"] is True and doc["bytes_read"] == 0 and not doc["issues"]
    # 1 chunk (64 KiB) at 1M and 8 at 28M..28.5M: written, nothing else.
    assert doc["chunks_written"] + doc["chunks_zeroed"] == 9, doc
    ref = reference_image(short_tmp / "ref.qcow2", 32 * MiB, original)
    assert subprocess.run(["qemu-img", "compare", str(disk), str(ref)], check=False).returncode == 0
    # Without the bitmap (removed), the same restore compares instead, and is still right.
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x97 8M 64k", str(disk)], check=True, capture_output=True
    )
    (name,) = image_bitmaps(disk)
    subprocess.run(["qemu-img", "bitmap", "--remove", str(disk), name], check=True)
    res = cli("restore", "disk", "latest", "--onto", disk, "--changed-only", "--json")
    doc = res.json_lines()[-1]
    assert res.code == 0 and doc["bitmap_used"] is False and doc["bytes_read"] > 0
    assert "no bitmap" in str(doc["bitmap_problem"])
    assert subprocess.run(["qemu-img", "compare", str(disk), str(ref)], check=False).returncode == 0


def test_a_bitmap_of_another_disk_is_never_taken_for_the_snapshot_s(
    cli: Cli, short_tmp: Path
) -> None:
    """Two images, each with a chain of its own (both at generation 1): restoring A's
    snapshot onto C with --changed-only compares (C's bitmap is not A's), and when C's
    file replaces A's, the next backup of that path reads it in full instead of trusting
    C's bitmap."""
    a, c = short_tmp / "a.qcow2", short_tmp / "c.qcow2"
    reference_image(a, 16 * MiB, [(0xAA, 0, 8 * MiB)])
    reference_image(c, 16 * MiB, [(0xBB, 0, 8 * MiB)])
    assert cli("init").code == 0
    first = cli("backup", "image", a, "--json")
    assert first.code == 0, first.err
    sid_a = str(first.json_lines()[-1]["snapshot_id"])
    assert cli("backup", "image", c, "-q").code == 0
    onto = cli("restore", "disk", sid_a, "--onto", c, "--changed-only", "--json")
    assert onto.code == 0, onto.err
    doc = onto.json_lines()[-1]
    assert doc["bitmap_used"] is False and doc["chunks_written"] > 0, doc
    assert subprocess.run(["qemu-img", "compare", str(a), str(c)], check=False).returncode == 0
    reference_image(c, 16 * MiB, [(0xCC, 0, 8 * MiB)])  # a new image, then a chain of its own
    assert cli("backup", "image", c, "-q").code == 0
    shutil.copyfile(c, a)  # A's path now holds C, bitmap and all
    again = cli("backup", "image", a, "--json")
    assert again.code == 0, again.err
    summary = again.json_lines()[-1]
    assert summary["bytes_read"] >= 8 * MiB, summary  # read in full, not from C's bitmap
    out = short_tmp / "out.raw"
    assert cli("restore", "disk", "latest", "--to", out).code == 0
    assert subprocess.run(["qemu-img", "compare", str(out), str(c)], check=False).returncode == 0


def test_an_image_backed_up_under_a_new_name_is_read_in_full(cli: Cli, short_tmp: Path) -> None:
    """The parent (same path) has the disk under another name: its bitmap is of no use
    (the new disk index has no parent disk to take clean chunks from), no failure."""
    image = short_tmp / "vm.qcow2"
    reference_image(image, 8 * MiB, [(0x5A, 0, 2 * MiB)])
    assert cli("init").code == 0
    assert cli("backup", "image", image, "-q").code == 0
    renamed = cli("backup", "image", image, "--name", "vda", "--json")
    assert renamed.code == 0, renamed.err
    assert renamed.json_lines()[-1]["bytes_read"] >= 2 * MiB
    again = cli("backup", "image", image, "--name", "vda", "--json")  # the chain goes on
    assert again.code == 0 and again.json_lines()[-1]["bytes_read"] == 0, again.err


def test_a_shrink_and_grow_between_backups_is_not_missed(cli: Cli, short_tmp: Path) -> None:
    """QEMU's bitmap does not record a shrink: what was cut off and grown back reads as
    zeros now, and the incremental must say so (not keep the parent's data there)."""
    image = short_tmp / "s.qcow2"
    reference_image(image, 128 * MiB, [(0x22, 100 * MiB, 1 * MiB), (0x23, 0, 1 * MiB)])
    assert cli("init").code == 0
    assert cli("backup", "image", image, "-q").code == 0
    for size in ("64M", "128M"):
        extra = ["--shrink"] if size == "64M" else []
        subprocess.run(["qemu-img", "resize", *extra, str(image), size], check=True)
    again = cli("backup", "image", image, "--json")
    assert again.code == 0, again.err
    assert again.json_lines()[-1]["bytes_read"] == 0  # nothing to read: zeros are known
    out = short_tmp / "out.raw"
    assert cli("restore", "disk", "latest", "--to", out).code == 0
    assert (
        subprocess.run(["qemu-img", "compare", str(out), str(image)], check=False).returncode == 0
    )


def test_changed_only_restore_after_a_shrink_and_grow_rewrites_what_was_cut(
    cli: Cli, short_tmp: Path
) -> None:
    image = short_tmp / "s.qcow2"
    writes = [(0x22, 100 * MiB, 1 * MiB), (0x23, 0, 1 * MiB)]
    reference_image(image, 128 * MiB, writes)
    assert cli("init").code == 0
    assert cli("backup", "image", image, "-q").code == 0
    subprocess.run(["qemu-img", "resize", "--shrink", str(image), "64M"], check=True)
    subprocess.run(["qemu-img", "resize", str(image), "128M"], check=True)
    res = cli("restore", "disk", "latest", "--onto", image, "--changed-only", "--json")
    assert res.code == 0, res.err
    doc = res.json_lines()[-1]
    assert doc["bitmap_used"] is True and doc["chunks_written"] == 16, doc  # 1 MiB at 100M
    ref = reference_image(short_tmp / "ref.qcow2", 128 * MiB, writes)
    assert (
        subprocess.run(["qemu-img", "compare", str(image), str(ref)], check=False).returncode == 0
    )


def test_restore_vm_of_disks_with_one_stem_into_a_relative_folder(
    cli: Cli, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two images a.qcow2 and a.raw restored as raw: two files (not one overwriting or
    refusing the other); a relative --to is made absolute."""
    two = short_tmp / "two"
    two.mkdir()
    reference_image(two / "a.qcow2", 4 * MiB, [(0x31, 0, 1 * MiB)])
    (two / "a.raw").write_bytes(b"\x32" * (2 * MiB))
    assert cli("init").code == 0
    assert cli("backup", "image", two / "a.qcow2", two / "a.raw", "-q").code == 0
    monkeypatch.chdir(short_tmp)
    res = cli("restore", "vm", "latest", "--to", "rv", "--format", "raw", "--json")
    assert res.code == 0, res.err
    disks = res.json_lines()[-1]["disks"]
    assert sorted(Path(str(p)).name for p in disks.values()) == ["a-2.raw", "a.raw"]  # type: ignore[union-attr]
    assert all(Path(str(p)).is_absolute() for p in disks.values())  # type: ignore[union-attr]
    restored = Path(str(disks["a.raw"]))  # type: ignore[index]
    assert restored.read_bytes() == (two / "a.raw").read_bytes()


@pytest.mark.parametrize("size", ["8M", "32M"])
def test_restore_onto_an_image_of_another_size_is_refused_naming_it(
    cli: Cli, short_tmp: Path, size: str
) -> None:
    image = short_tmp / "vm.qcow2"
    reference_image(image, 16 * MiB, [(0x41, 0, 1 * MiB)])
    assert cli("init").code == 0
    assert cli("backup", "image", image, "-q").code == 0
    other = short_tmp / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), size], check=True)
    res = cli("restore", "disk", "latest", "--onto", other)
    assert res.code == 1 and f"onto {other}" in res.err and "qemu-img resize" in res.err, res.err
    assert "socket" not in res.err


def test_image_arguments_that_are_odd(
    cli: Cli, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative name with a colon is a file (not a qemu protocol), a FIFO is refused (it
    would block the probe), and one file given twice is a usage error."""
    monkeypatch.chdir(short_tmp)
    reference_image(short_tmp / "vm:1.qcow2", 4 * MiB, [(0x51, 0, 1 * MiB)])
    assert cli("init").code == 0
    assert cli("backup", "image", "vm:1.qcow2", "-q").code == 0
    res = cli("restore", "disk", "latest", "--to", "web:2024.qcow2", "--format", "qcow2")
    assert res.code == 0, res.err
    same = ["qemu-img", "compare", str(short_tmp / "vm:1.qcow2"), str(short_tmp / "web:2024.qcow2")]
    assert subprocess.run(same, check=False, capture_output=True).returncode == 0
    onto = cli("restore", "disk", "latest", "--onto", "web:2024.qcow2", "--changed-only")
    assert onto.code == 0, onto.err
    os.mkfifo(short_tmp / "fifo")
    fifo = cli("backup", "image", short_tmp / "fifo")
    assert fifo.code == 1 and "not a regular file or block device" in fifo.err, fifo.err
    twice = cli(
        "backup", "image", "vm:1.qcow2", short_tmp / "vm:1.qcow2", "--name", "a", "--name", "b"
    )
    assert twice.code == 2 and "same file" in twice.err, twice.err


def test_a_qcow2_on_read_only_storage_is_read_in_full(cli: Cli, short_tmp: Path) -> None:
    folder, ro = short_tmp / "images", short_tmp / "ro"
    folder.mkdir()
    ro.mkdir()
    reference_image(folder / "vm.qcow2", 4 * MiB, [(0x61, 0, 1 * MiB)])
    subprocess.run(["mount", "--bind", str(folder), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        assert cli("init").code == 0
        for _ in range(2):  # no bitmap can be kept: each backup reads it all
            res = cli("backup", "image", ro / "vm.qcow2", "--json")
            assert res.code == 0, res.err
            assert res.json_lines()[-1]["bytes_read"] >= 1 * MiB
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert image_bitmaps(folder / "vm.qcow2") == []


def test_restore_onto_a_raw_disk_that_a_running_vm_writes_is_refused(
    cli: Cli, short_tmp: Path
) -> None:
    """QEMU's image locks say a VM has the file open for writing: writing under it would
    corrupt the guest's view. (qcow2 targets are refused by qemu-storage-daemon's locks.)"""
    disk = short_tmp / "vm.raw"
    disk.write_bytes(os.urandom(1 * MiB) + bytes(3 * MiB))
    assert cli("init").code == 0
    assert cli("backup", "image", disk, "-q").code == 0
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "accel=tcg", "-nographic", "-display", "none",
         "-S", "-qmp", f"unix:{short_tmp}/q.sock,server=on,wait=off",
         "-drive", f"file={disk},format=raw,if=virtio"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_socket(short_tmp / "q.sock", qemu)
        res = cli("restore", "disk", "latest", "--onto", disk, "--changed-only")
        assert res.code == 1 and "running VM" in res.err, res.err
    finally:
        qemu.kill()
        qemu.wait()
    res = cli("restore", "disk", "latest", "--onto", disk, "--changed-only")
    assert res.code == 0, res.err


def test_image_snapshots_record_formats_and_why_a_disk_was_read_in_full(
    cli: Cli, short_tmp: Path
) -> None:
    image = short_tmp / "vm.qcow2"
    reference_image(image, 4 * MiB, [(0x71, 0, 1 * MiB)])
    assert cli("init").code == 0
    first = cli("backup", "image", image)
    assert first.code == 0 and "read in full: first backup of this disk" in first.out, first.out
    (name,) = image_bitmaps(image)
    subprocess.run(["qemu-img", "bitmap", "--remove", str(image), name], check=True)
    again = cli("backup", "image", image)
    assert again.code == 0 and f"read in full: bitmap {name}" in again.out, again.out
    res = cli("restore", "vm", "latest", "--to", short_tmp / "rv", "--json")
    assert res.code == 0, res.err
    restored = Path(str(res.json_lines()[-1]["disks"]["vm.qcow2"]))  # type: ignore[index]
    assert restored.name == "vm.qcow2"  # its format back, not raw
    cmp = ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(restored), str(image)]
    assert subprocess.run(cmp, check=False).returncode == 0
