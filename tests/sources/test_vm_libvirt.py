"""Backups of libvirt domains on a private libvirtd: backupBegin, checkpoints, crashes, shut-off."""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from stratavault.errors import SourceError
from stratavault.jobs import (
    BackupDisksOptions,
    NbdDiskSource,
    RestoreDiskOptions,
    backup_disks,
    restore_disk as restore_disk_job,
)
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import Snapshot
from stratavault.sources import (
    DiskExport,
    LibvirtBackup,
    LibvirtDomain,
    remove_libvirt_backup_leftovers,
)
from stratavault.storage import MemoryStorage
from tests.guest.build import GuestImage, make_data_disk
from tests.sources.libvirt_harness import Domain, Libvirtd, libvirtd, make_domain
from tests.sources.vm_harness import (
    KiB,
    MiB,
    compare,
    data_ranges,
    dirty_ranges,
    reference_image,
    short_tmp,
)

__all__ = ["libvirtd", "make_domain", "short_tmp"]  # fixtures

pytestmark = pytest.mark.infra("libvirt")


def chain(backup: LibvirtBackup) -> dict[str, str]:
    """What the snapshot records: the checkpoint each disk's next backup expects."""
    return {e.device: e.new_bitmap for e in backup.exports if e.new_bitmap}


def assert_torn_down(dom: Domain, scratch: Path) -> None:
    assert dom.job_type() == 0
    assert list(scratch.iterdir()) == []


def assert_same(export: DiskExport, reference: Path) -> None:
    result = compare(export.uri, reference)
    assert result.returncode == 0, result.stdout + result.stderr


def test_full_then_incremental_of_two_disks_while_the_guest_writes(
    make_domain: Callable[..., Domain], libvirtd: Libvirtd, short_tmp: Path
) -> None:
    dom = make_domain((64, 32))
    dom.start()
    dom.write("vda", 0x11, 0, 1 * MiB)
    dom.write("vdb", 0x22, 4 * MiB, 128 * KiB)
    scratch = short_tmp / "scratch"
    with (
        LibvirtDomain(dom.name, uri=libvirtd.uri) as domain,
        LibvirtBackup(domain, scratch) as first,
    ):
        vda, vdb = first.exports
        assert (vda.device, vda.size_bytes, vdb.device, vdb.size_bytes) == (
            "vda", 64 * MiB, "vdb", 32 * MiB,
        )  # fmt: skip
        assert (vda.bitmap_context, vdb.bitmap_context) == (None, None)
        assert vda.full_read_reason == "first backup of this disk: no checkpoint yet"
        assert (vda.new_bitmap, vdb.new_bitmap) == ("stratavault-1", "stratavault-1")
        assert first.consistency_text == "crash-consistent (no agent)"
        assert ET.fromstring(first.config["domain_xml"]).findtext("name") == dom.name
        assert first.config["hypervisor"] == "libvirt" and first.config["state"] == "paused"
        assert [d["source"] for d in first.config["disks"]] == [str(p) for p in dom.disks]
        # The guest keeps writing, over old data and into holes: the exports do not change.
        dom.write("vda", 0x99, 0, 64 * KiB)
        dom.write("vda", 0x99, 10 * MiB, 64 * KiB)
        dom.write("vdb", 0x99, 4 * MiB, 1 * MiB)
        assert_same(vda, reference_image(short_tmp / "a.qcow2", 64 * MiB, [(0x11, 0, 1 * MiB)]))
        assert_same(
            vdb, reference_image(short_tmp / "b.qcow2", 32 * MiB, [(0x22, 4 * MiB, 128 * KiB)])
        )
        assert data_ranges(vda.uri)[0] == (0, 1 * MiB)
        expected = chain(first)
    assert_torn_down(dom, scratch)
    assert dom.checkpoints() == ["stratavault-1"]

    dom.write("vda", 0x01, 1 * MiB, 64 * KiB)
    dom.write("vda", 0x02, 5 * MiB, 192 * KiB)
    dom.write("vdb", 0x03, 0, 64 * KiB)
    with (
        LibvirtDomain(dom.name, uri=libvirtd.uri) as domain,
        LibvirtBackup(domain, scratch, expected_bitmaps=expected) as second,
    ):
        dom.write("vda", 0x04, 20 * MiB, 64 * KiB)  # after the point in time
        dom.write("vdb", 0x04, 8 * MiB, 64 * KiB)
        vda, vdb = second.exports
        assert vda.bitmap_context == "qemu:dirty-bitmap:backup-vda"
        assert vdb.bitmap_context == "qemu:dirty-bitmap:backup-vdb"
        assert (vda.full_read_reason, vdb.full_read_reason) == (None, None)
        # Exactly what was written between the two points in time, on both disks.
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [
            (0, 64 * KiB),
            (1 * MiB, 64 * KiB),
            (5 * MiB, 192 * KiB),
            (10 * MiB, 64 * KiB),
        ]
        assert dirty_ranges(vdb.uri, vdb.bitmap_context) == [(0, 64 * KiB), (4 * MiB, 1 * MiB)]
        assert chain(second) == {"vda": "stratavault-2", "vdb": "stratavault-2"}
        ref = reference_image(
            short_tmp / "b2.qcow2", 32 * MiB,
            [(0x22, 4 * MiB, 128 * KiB), (0x99, 4 * MiB, 1 * MiB), (0x03, 0, 64 * KiB)],
        )  # fmt: skip
        assert_same(vdb, ref)
    assert_torn_down(dom, scratch)
    assert dom.checkpoints() == ["stratavault-2"]  # the old one is dropped on success


def test_a_failed_backup_keeps_the_chain_and_loses_no_change(
    make_domain: Callable[..., Domain], libvirtd: Libvirtd, short_tmp: Path
) -> None:
    dom = make_domain((32,))
    dom.start()
    scratch = short_tmp / "scratch"
    with LibvirtDomain(dom.name, uri=libvirtd.uri) as domain:
        with LibvirtBackup(domain, scratch) as first:
            expected = chain(first)
        dom.write("vda", 0x01, 1 * MiB, 64 * KiB)
        failing = LibvirtBackup(domain, scratch, expected_bitmaps=expected)
        with pytest.raises(RuntimeError, match="upload failed"), failing as failed:
            assert failed.checkpoint == "stratavault-2"
            dom.write("vda", 0x02, 3 * MiB, 64 * KiB)  # after the failed point in time
            raise RuntimeError("upload failed")
        assert_torn_down(dom, scratch)
        assert dom.checkpoints() == ["stratavault-1"]
        dom.write("vda", 0x03, 7 * MiB, 64 * KiB)
        with LibvirtBackup(domain, scratch, expected_bitmaps=expected) as retry:
            (vda,) = retry.exports
            assert vda.bitmap_context is not None
            assert dirty_ranges(vda.uri, vda.bitmap_context) == [
                (1 * MiB, 64 * KiB),
                (3 * MiB, 64 * KiB),
                (7 * MiB, 64 * KiB),
            ]
            # A second backup of the same domain cannot start meanwhile.
            with pytest.raises(SourceError, match="a backup job is already running"):
                LibvirtBackup(domain, short_tmp / "other").__enter__()
            assert dom.checkpoints() == ["stratavault-1", "stratavault-2"]
        assert dom.checkpoints() == ["stratavault-2"]
        # libvirt refuses the job (the socket path is taken): nothing is left behind.
        blocked = short_tmp / "blocked"
        (blocked / "nbd.sock").mkdir(parents=True)
        with pytest.raises(SourceError, match="starting the backup job of the libvirt domain") as e:
            LibvirtBackup(domain, blocked, expected_bitmaps={"vda": "stratavault-2"}).__enter__()
        assert "'nbd-server-start'" in str(e.value)
        assert dom.job_type() == 0
        assert dom.checkpoints() == ["stratavault-2"]


def test_kill_9_breaks_the_checkpoint_and_the_backup_falls_back_to_a_full_read(
    make_domain: Callable[..., Domain], libvirtd: Libvirtd, short_tmp: Path
) -> None:
    dom = make_domain((32, 16))
    dom.start()
    dom.write("vda", 0x11, 0, 256 * KiB)
    scratch = short_tmp / "scratch"
    with LibvirtDomain(dom.name, uri=libvirtd.uri) as domain:
        with LibvirtBackup(domain, scratch) as first:
            expected = chain(first)
        dom.write("vdb", 0x22, 2 * MiB, 64 * KiB)
        for device in ("vda", "vdb"):  # the data survives the crash; the bitmaps do not
            dom.hmp_io(device, "flush")
        dom.kill9()
        dom.start()
        assert dom.checkpoints() == ["stratavault-1"]  # libvirt still lists it
        dom.write("vda", 0x33, 1 * MiB, 64 * KiB)
        with LibvirtBackup(domain, scratch, expected_bitmaps=expected) as fallback:
            vda, vdb = fallback.exports
            assert (vda.bitmap_context, vdb.bitmap_context) == (None, None)
            assert vda.full_read_reason is not None
            assert "missing or broken bitmap" in vda.full_read_reason
            assert "a new chain starts" in vda.full_read_reason
            assert fallback.removed_checkpoints == ["stratavault-1"]
            assert chain(fallback) == {"vda": "stratavault-2", "vdb": "stratavault-2"}
            ref = reference_image(
                short_tmp / "a.qcow2", 32 * MiB, [(0x11, 0, 256 * KiB), (0x33, 1 * MiB, 64 * KiB)]
            )
            assert_same(vda, ref)
            assert_same(vdb, reference_image(short_tmp / "b.qcow2", 16 * MiB,
                                             [(0x22, 2 * MiB, 64 * KiB)]))  # fmt: skip
            expected = chain(fallback)
        assert_torn_down(dom, scratch)
        dom.write("vdb", 0x44, 5 * MiB, 64 * KiB)
        with LibvirtBackup(domain, scratch, expected_bitmaps=expected) as fresh:
            vda, vdb = fresh.exports
            assert vdb.bitmap_context is not None and vda.bitmap_context is not None
            assert dirty_ranges(vdb.uri, vdb.bitmap_context) == [(5 * MiB, 64 * KiB)]
            assert dirty_ranges(vda.uri, vda.bitmap_context) == []
        assert dom.checkpoints() == ["stratavault-3"]


def test_a_shut_off_domain_is_read_from_its_images_and_its_chain_continues(
    make_domain: Callable[..., Domain], libvirtd: Libvirtd, short_tmp: Path
) -> None:
    dom = make_domain((32, 16), fmts=("qcow2", "raw"))
    dom.start()
    dom.write("vda", 0x11, 0, 128 * KiB)
    dom.write("vdb", 0x22, 1 * MiB, 64 * KiB)
    scratch = short_tmp / "scratch"
    with LibvirtDomain(dom.name, uri=libvirtd.uri) as domain:
        with LibvirtBackup(domain, scratch) as running:
            vda, vdb = running.exports
            assert vdb.full_read_reason == "raw disk: libvirt checkpoints need qcow2; full read"
            assert chain(running) == {"vda": "stratavault-1"}  # raw disks carry none
            expected = chain(running)
        dom.write("vda", 0x33, 2 * MiB, 64 * KiB)
        dom.shut_down()
        with LibvirtBackup(domain, scratch, expected_bitmaps=expected) as stopped:
            assert stopped.config["state"] == "shutoff"
            assert stopped.checkpoint is None
            vda, vdb = stopped.exports
            assert (vda.device, vdb.device) == ("vda", "vdb")
            assert vda.bitmap_context is None
            assert vda.full_read_reason == "domain is shut off: disk image read in full"
            assert chain(stopped) == {"vda": "stratavault-1"}  # the chain goes on
            ref = reference_image(
                short_tmp / "a.qcow2", 32 * MiB, [(0x11, 0, 128 * KiB), (0x33, 2 * MiB, 64 * KiB)]
            )
            assert_same(vda, ref)
        assert list(scratch.iterdir()) == []
        assert dom.checkpoints() == ["stratavault-1"]
        dom.start()
        dom.write("vda", 0x44, 4 * MiB, 64 * KiB)
        with LibvirtBackup(domain, scratch, expected_bitmaps=expected) as again:
            vda = again.exports[0]
            assert vda.bitmap_context is not None
            assert dirty_ranges(vda.uri, vda.bitmap_context) == [
                (2 * MiB, 64 * KiB),
                (4 * MiB, 64 * KiB),
            ]


def test_quiescing_through_an_agent_that_does_not_answer_is_crash_consistent(
    make_domain: Callable[..., Domain], libvirtd: Libvirtd, short_tmp: Path
) -> None:
    dom = make_domain((16,), guest_agent=True)
    dom.start()
    with LibvirtDomain(dom.name, uri=libvirtd.uri) as domain:
        assert domain.has_guest_agent()
        with LibvirtBackup(domain, short_tmp / "s") as backup:
            assert backup.consistency_text.startswith("crash-consistent (fsfreeze failed: ")
            assert backup.frozen_s is None
        with LibvirtBackup(domain, short_tmp / "s", quiesce=False) as backup:
            assert backup.consistency_text == "crash-consistent (quiescing not asked for)"


def test_lookup_by_uuid_unknown_domains_and_leftover_jobs(
    make_domain: Callable[..., Domain], libvirtd: Libvirtd, short_tmp: Path
) -> None:
    dom = make_domain((16,))
    dom.start()
    uuid = dom.domain.UUIDString()
    with LibvirtDomain(uuid, uri=libvirtd.uri) as domain:
        assert domain.name == dom.name
        disk = domain.disks()[0]
        assert (disk.device, disk.format, disk.size_bytes, disk.source) == (
            "vda", "qcow2", 16 * MiB, str(dom.disks[0]),
        )  # fmt: skip
        # A backup process that died mid-way leaves its job running in libvirt.
        dead = LibvirtBackup(domain, short_tmp / "s").__enter__()
        assert dom.job_type() != 0
        assert remove_libvirt_backup_leftovers(domain) == ["backup job"]
        assert dom.job_type() == 0
        assert remove_libvirt_backup_leftovers(domain) == []
        with LibvirtBackup(domain, short_tmp / "s", expected_bitmaps=chain(dead)) as after:
            assert after.exports[0].bitmap_context is not None
        assert dom.checkpoints() == ["stratavault-2"]
    with pytest.raises(SourceError, match="no domain with that name or UUID"):
        LibvirtDomain("no-such-domain", uri=libvirtd.uri)


def backup_into(repo: Repository, backup: LibvirtBackup, parent: Snapshot | None) -> Snapshot:
    """What the backup job does with a VM backup's exports (as jobs.backup_vm does)."""
    sources = [NbdDiskSource(export) for export in backup.exports]
    config = {**backup.config, "consistency": backup.consistency_text}
    options = BackupDisksOptions(
        host="h", paths=("dom",), kind="vm", parent=parent.id if parent else None,
        workers=2, vm_config=config,
    )  # fmt: skip
    try:
        return backup_disks(repo, sources, options)
    finally:
        for source in sources:
            source.close()


def restored_equals(repo: Repository, snap: Snapshot, disk: str, ref: Path) -> bool:
    out = ref.with_suffix(".restored.raw")
    restore_disk_job(repo, snap, RestoreDiskOptions(target=out, disk=disk))
    argv = ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(out), str(ref)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    out.unlink()
    return result.returncode == 0


def test_the_backup_job_stores_libvirt_exports_like_qmp_ones(
    make_domain: Callable[..., Domain], libvirtd: Libvirtd, short_tmp: Path
) -> None:
    repo = Repository.init(
        MemoryStorage(), b"pw", cache_dir=short_tmp / "cache", kdf=KdfParams.fast()
    )
    dom = make_domain((32, 16))
    dom.start()
    writes_a = [(0x11, 0, 1 * MiB), (0x12, 9 * MiB, 64 * KiB)]
    writes_b = [(0x21, 2 * MiB, 128 * KiB)]
    for pattern, offset, length in writes_a:
        dom.write("vda", pattern, offset, length)
    for pattern, offset, length in writes_b:
        dom.write("vdb", pattern, offset, length)
    scratch = short_tmp / "scratch"
    with LibvirtDomain(dom.name, uri=libvirtd.uri) as domain:
        with LibvirtBackup(domain, scratch) as backup:
            full = backup_into(repo, backup, None)
        assert {d.name: d.bitmap for d in full.disks} == {
            "vda": "stratavault-1",
            "vdb": "stratavault-1",
        }
        assert full.vm_config is not None and full.vm_config["domain_xml"].startswith("<domain")
        writes_a.append((0x13, 20 * MiB, 64 * KiB))
        dom.write("vda", 0x13, 20 * MiB, 64 * KiB)
        expected = {d.name: d.bitmap for d in full.disks if d.bitmap}
        with LibvirtBackup(domain, scratch, expected_bitmaps=expected) as backup:
            assert all(e.bitmap_context for e in backup.exports)
            incremental = backup_into(repo, backup, full)
    ref_a = reference_image(short_tmp / "ra.qcow2", 32 * MiB, writes_a)
    ref_b = reference_image(short_tmp / "rb.qcow2", 16 * MiB, writes_b)
    assert restored_equals(repo, incremental, "vda", ref_a)
    assert restored_equals(repo, incremental, "vdb", ref_b)


def test_a_real_guest_is_frozen_through_libvirts_agent_and_its_data_disk_is_clean(
    make_domain: Callable[..., Domain],
    libvirtd: Libvirtd,
    short_tmp: Path,
    test_guest_image: GuestImage,
) -> None:
    import libvirt_qemu

    image = test_guest_image
    disks = [image.boot_overlay(short_tmp / "boot.qcow2"), make_data_disk(short_tmp / "d.qcow2")]
    cmdline = image.append("sv.writer=1", "sv.writer_interval=0.05")
    dom = make_domain(guest_agent=True, boot=(image.kernel, image.initrd, cmdline), disks=disks)
    dom.start(paused=False)
    dom.wait_for("stratavault-guest: writer started")
    dom.wait_for_agent()
    copy = short_tmp / "data.raw"
    with LibvirtDomain(dom.name, uri=libvirtd.uri) as domain:
        start = time.monotonic()
        with LibvirtBackup(domain, short_tmp / "s") as backup:
            took = time.monotonic() - start
            assert backup.consistency_text == "application-consistent (fs frozen)"
            assert backup.frozen_s is not None
            print(f"guest frozen for {backup.frozen_s * 1000:.0f} ms (TCG, through libvirt)")
            assert backup.frozen_s < 5
            vdb = backup.exports[1]
            subprocess.run(["qemu-img", "convert", "-O", "raw", vdb.uri, str(copy)], check=True)
        status = libvirt_qemu.qemuAgentCommand(
            dom.domain, '{"execute": "guest-fsfreeze-status"}', 30, 0
        )
        assert '"thawed"' in status
    # Frozen ext4 has its journal checkpointed: the point in time needs no replay, fsck is clean.
    features = subprocess.run(
        ["dumpe2fs", "-h", str(copy)], capture_output=True, text=True, check=True
    ).stdout
    assert "needs_recovery" not in features
    subprocess.run(["e2fsck", "-fn", str(copy)], check=True, capture_output=True)
    assert took < 60
