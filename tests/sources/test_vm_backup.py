"""Live backups of a real QEMU VM: one transaction, fleecing, bitmap chains, teardown, crashes."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from stratavault import nbd
from stratavault.errors import SourceError
from stratavault.sources import (
    QmpSession,
    VmBackup,
    find_guest_agent_socket,
    list_vm_disks,
    remove_backup_leftovers,
)
from tests.sources.vm_harness import (
    KiB,
    MiB,
    Vm,
    compare,
    data_ranges,
    dirty_ranges,
    make_vm,
    plain,
    reference_image,
    short_tmp,
)

__all__ = ["make_vm", "short_tmp"]  # fixtures

pytestmark = pytest.mark.infra("qemu")


def bitmaps(session: QmpSession) -> dict[str, list[tuple[str, bool, int]]]:
    """Per device: (name, recording, count) of its named bitmaps."""
    return {
        d.device: [(b.name, b.recording, b.count_bytes) for b in d.bitmaps]
        for d in list_vm_disks(session)
    }


def assert_torn_down(session: QmpSession, nodes_before: set[str], scratch: Path) -> None:
    nodes = {n["node-name"] for n in session.execute("query-named-block-nodes", {"flat": True})}
    assert nodes == nodes_before
    assert session.execute("query-block-exports") == []
    assert session.execute("query-block-jobs") == []
    assert list(scratch.iterdir()) == []


def node_names(session: QmpSession) -> set[str]:
    return {n["node-name"] for n in session.execute("query-named-block-nodes", {"flat": True})}


def chain(backup: VmBackup) -> dict[str, str]:
    """What the snapshot records: the bitmap each disk's next backup expects."""
    return {e.device: e.new_bitmap for e in backup.exports if e.new_bitmap}


def generations(chain: dict[str, str]) -> dict[str, str | None]:
    """The chain names without their random tokens (``stratavault-2`` per disk)."""
    return {device: plain(name) for device, name in chain.items()}


def test_first_backup_exports_both_disks_at_the_transaction_point(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64, 32))
    session = vm.start()
    vm.write(session, "vda", 0x11, 0, 1 * MiB)
    vm.write(session, "vdb", 0x22, 4 * MiB, 128 * KiB)
    before = node_names(session)
    scratch = short_tmp / "scratch"
    with VmBackup(session, scratch, find_guest_agent=False) as backup:
        vda, vdb = backup.exports
        assert (vda.device, vda.size_bytes, vdb.device, vdb.size_bytes) == (
            "vda", 64 * MiB, "vdb", 32 * MiB,
        )  # fmt: skip
        assert vda.bitmap_context is None and vdb.bitmap_context is None
        assert vda.full_read_reason == "first backup of this disk: no bitmap yet"
        assert (plain(vda.new_bitmap), plain(vdb.new_bitmap)) == ("stratavault-1", "stratavault-1")
        for name in (vda.new_bitmap, vdb.new_bitmap):  # a random token makes each one unique
            assert name is not None and re.fullmatch(r"stratavault-1-[0-9a-f]{12}", name), name
        assert backup.consistency_text == "crash-consistent (no agent)"
        assert backup.config["argv"] == vm.argv()
        # The guest keeps writing, over old data and into holes; the exports do not change.
        vm.write(session, "vda", 0x99, 0, 64 * KiB)
        vm.write(session, "vda", 0x99, 10 * MiB, 64 * KiB)
        vm.write(session, "vdb", 0x99, 4 * MiB, 1 * MiB)
        vm.read_check(session, "vda", 0x99, 0, 64 * KiB)
        ref_a = reference_image(short_tmp / "a.qcow2", 64 * MiB, [(0x11, 0, 1 * MiB)])
        ref_b = reference_image(short_tmp / "b.qcow2", 32 * MiB, [(0x22, 4 * MiB, 128 * KiB)])
        assert compare(vda.uri, ref_a).returncode == 0, compare(vda.uri, ref_a).stdout
        assert compare(vdb.uri, ref_b).returncode == 0, compare(vdb.uri, ref_b).stdout
        assert data_ranges(vda.uri)[0] == (0, 1 * MiB)
        assert (4 * MiB, 128 * KiB) in data_ranges(vdb.uri)
    assert_torn_down(session, before, scratch)
    assert bitmaps(session) == {
        "vda": [(vda.new_bitmap, True, 128 * KiB)],
        "vdb": [(vdb.new_bitmap, True, 1 * MiB)],
    }


def test_incrementals_see_exactly_the_writes_between_two_transactions(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64, 32))
    session = vm.start()
    scratch = short_tmp / "scratch"
    before = node_names(session)
    with VmBackup(session, scratch, find_guest_agent=False) as first:
        expected = chain(first)
    vm.write(session, "vda", 0x01, 1 * MiB, 64 * KiB)
    vm.write(session, "vda", 0x02, 5 * MiB, 192 * KiB)
    vm.write(session, "vdb", 0x03, 0, 64 * KiB)
    with VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as second:
        vm.write(session, "vda", 0x04, 20 * MiB, 64 * KiB)  # after the point in time
        vda, vdb = second.exports
        assert vda.bitmap_context == f"qemu:dirty-bitmap:{expected['vda']}"
        assert vda.full_read_reason is None
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [
            (1 * MiB, 64 * KiB),
            (5 * MiB, 192 * KiB),
        ]
        assert vdb.bitmap_context == f"qemu:dirty-bitmap:{expected['vdb']}"
        assert dirty_ranges(vdb.uri, vdb.bitmap_context) == [(0, 64 * KiB)]
        ref = reference_image(
            short_tmp / "a.qcow2", 64 * MiB, [(0x01, 1 * MiB, 64 * KiB), (0x02, 5 * MiB, 192 * KiB)]
        )
        assert compare(vda.uri, ref).returncode == 0
        expected = chain(second)
    assert generations(expected) == {"vda": "stratavault-2", "vdb": "stratavault-2"}
    assert_torn_down(session, before, scratch)
    with VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as third:
        vda, vdb = third.exports
        assert vda.bitmap_context and vdb.bitmap_context
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [(20 * MiB, 64 * KiB)]
        assert dirty_ranges(vdb.uri, vdb.bitmap_context) == []
    assert generations(chain(third)) == {"vda": "stratavault-3", "vdb": "stratavault-3"}
    assert bitmaps(session) == {
        "vda": [(chain(third)["vda"], True, 0)],
        "vdb": [(chain(third)["vdb"], True, 0)],
    }


def test_failure_inside_the_backup_merges_the_bitmap_back(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64, 32))
    session = vm.start()
    scratch = short_tmp / "scratch"
    before = node_names(session)
    with VmBackup(session, scratch, find_guest_agent=False) as first:
        expected = chain(first)
    vm.write(session, "vda", 0x01, 1 * MiB, 64 * KiB)
    with (
        pytest.raises(RuntimeError, match="upload failed"),
        VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False),
    ):
        vm.write(session, "vda", 0x02, 8 * MiB, 64 * KiB)
        raise RuntimeError("upload failed")
    assert_torn_down(session, before, scratch)
    assert bitmaps(session) == {
        "vda": [(expected["vda"], True, 128 * KiB)],
        "vdb": [(expected["vdb"], True, 0)],
    }
    with VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as again:
        vda = again.exports[0]
        assert vda.bitmap_context == f"qemu:dirty-bitmap:{expected['vda']}"
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [
            (1 * MiB, 64 * KiB), (8 * MiB, 64 * KiB),
        ]  # fmt: skip


def test_export_killed_mid_way_loses_no_change(make_vm: Callable[..., Vm], short_tmp: Path) -> None:
    vm = make_vm((64,))
    session = vm.start()
    scratch = short_tmp / "scratch"
    before = node_names(session)
    with VmBackup(session, scratch, find_guest_agent=False) as first:
        expected = chain(first)
    vm.write(session, "vda", 0x01, 3 * MiB, 64 * KiB)
    with (
        pytest.raises(subprocess.CalledProcessError) as err,
        VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as backup,
    ):
        (export_id,) = [e["id"] for e in session.execute("query-block-exports")]
        session.execute("block-export-del", {"id": export_id, "mode": "hard"})
        vda = backup.exports[0]
        assert vda.bitmap_context is not None
        dirty_ranges(vda.uri, vda.bitmap_context)  # the reader fails
    assert any("block-export-del" in note for note in err.value.__notes__)
    assert_torn_down(session, before, scratch)
    assert bitmaps(session) == {"vda": [(expected["vda"], True, 64 * KiB)]}


def test_failure_after_the_transaction_during_start_merges_back(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64,))
    session = vm.start()
    scratch = short_tmp / "scratch"
    with VmBackup(session, scratch, find_guest_agent=False) as first:
        expected = chain(first)
    before = node_names(session)
    vm.write(session, "vda", 0x01, 0, 64 * KiB)
    other = {"type": "unix", "data": {"path": str(short_tmp / "other-nbd.sock")}}
    session.execute("nbd-server-start", {"addr": other})  # someone else's NBD server
    with pytest.raises(SourceError, match=r"nbd-server-start.*already running"):
        VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False).__enter__()
    session.execute("nbd-server-stop")
    assert_torn_down(session, before, scratch)
    assert bitmaps(session) == {"vda": [(expected["vda"], True, 64 * KiB)]}


def test_kill_9_after_a_backup_loses_the_new_bitmap_and_falls_back(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64, 32))
    session = vm.start()
    scratch = short_tmp / "scratch"
    vm.write(session, "vda", 0x01, 0, 64 * KiB)
    with VmBackup(session, scratch, find_guest_agent=False) as first:
        expected = chain(first)
    vm.hmp_io(session, "vda", "flush")  # the guest flushed; what it did not flush is lost
    vm.kill()  # SIGKILL: the first bitmap was added at run time and never reached the file
    session = vm.start()
    assert bitmaps(session) == {"vda": [], "vdb": []}
    with VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as backup:
        for export in backup.exports:
            assert export.bitmap_context is None
            assert export.full_read_reason is not None
            assert f"{expected[export.device]} expected by the previous snapshot is missing" in (
                export.full_read_reason
            )
            assert plain(export.new_bitmap) == "stratavault-2"
        ref = reference_image(short_tmp / "a.qcow2", 64 * MiB, [(0x01, 0, 64 * KiB)])
        assert compare(backup.exports[0].uri, ref).returncode == 0
    assert bitmaps(session) == {
        "vda": [(chain(backup)["vda"], True, 0)],
        "vdb": [(chain(backup)["vdb"], True, 0)],
    }


def test_restart_keeps_the_chain_and_kill_9_makes_it_inconsistent(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64,))
    session = vm.start()
    scratch = short_tmp / "scratch"
    with VmBackup(session, scratch, find_guest_agent=False) as first:
        expected = chain(first)
    vm.write(session, "vda", 0x01, 2 * MiB, 64 * KiB)
    vm.quit()  # clean shutdown: the first bitmap is stored in the qcow2
    session = vm.start()
    vm.write(session, "vda", 0x02, 6 * MiB, 64 * KiB)
    with VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as second:
        vda = second.exports[0]
        assert vda.bitmap_context == f"qemu:dirty-bitmap:{expected['vda']}"
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [
            (2 * MiB, 64 * KiB), (6 * MiB, 64 * KiB),
        ]  # fmt: skip
        expected = chain(second)
    assert generations(expected) == {"vda": "stratavault-2"}
    vm.quit()
    session = vm.start()  # the second bitmap is in the file now, and in use
    vm.write(session, "vda", 0x03, 9 * MiB, 64 * KiB)
    vm.hmp_io(session, "vda", "flush")
    vm.kill()
    session = vm.start()
    (disk,) = list_vm_disks(session)
    stale = disk.bitmap(expected["vda"])
    assert stale is not None and stale.inconsistent and not stale.recording
    with VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as third:
        vda = third.exports[0]
        assert vda.bitmap_context is None
        assert vda.full_read_reason is not None and "inconsistent" in vda.full_read_reason
        assert plain(vda.new_bitmap) == "stratavault-3"
        ref = reference_image(
            short_tmp / "a.qcow2", 64 * MiB,
            [(0x01, 2 * MiB, 64 * KiB), (0x02, 6 * MiB, 64 * KiB), (0x03, 9 * MiB, 64 * KiB)],
        )  # fmt: skip
        assert compare(vda.uri, ref).returncode == 0
    assert bitmaps(session) == {"vda": [(vda.new_bitmap, True, 0)]}


@pytest.mark.parametrize(
    "leftover",
    ["stratavault-2-0123456789ab", "stratavault-2"],  # left by this version, by an older one
)
def test_an_interrupted_backup_is_recovered_by_the_next_one(
    make_vm: Callable[..., Vm], short_tmp: Path, leftover: str
) -> None:
    vm = make_vm((64,))
    session = vm.start()
    scratch = short_tmp / "scratch"
    with VmBackup(session, scratch, find_guest_agent=False) as first:
        expected = chain(first)
    vm.write(session, "vda", 0x01, 1 * MiB, 64 * KiB)
    # What a backup process that died right after its transaction leaves behind:
    actions = [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": leftover, "persistent": True}},
        {"type": "block-dirty-bitmap-disable",
         "data": {"node": "disk0", "name": expected["vda"]}},
    ]  # fmt: skip
    session.execute("transaction", {"actions": actions})
    vm.write(session, "vda", 0x02, 3 * MiB, 64 * KiB)
    with VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as backup:
        vda = backup.exports[0]
        assert vda.bitmap_context == f"qemu:dirty-bitmap:{expected['vda']}"
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [
            (1 * MiB, 64 * KiB), (3 * MiB, 64 * KiB),
        ]  # fmt: skip
        assert plain(vda.new_bitmap) == "stratavault-3"
    assert bitmaps(session) == {"vda": [(vda.new_bitmap, True, 0)]}


def test_stale_bitmaps_of_a_lost_chain_are_removed(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64,))
    session = vm.start()
    # Chain bitmaps with and without a token (left by an older version), and someone else's.
    for name in ("stratavault-3-0123456789ab", "stratavault-4", "user-bitmap"):
        session.execute("block-dirty-bitmap-add", {"node": "disk0", "name": name})
    with VmBackup(session, short_tmp / "s", find_guest_agent=False) as backup:
        new = backup.exports[0].new_bitmap
        assert plain(new) == "stratavault-5"
    assert sorted(bitmaps(session)["vda"]) == [(new, True, 0), ("user-bitmap", True, 0)]


def test_agent_channel_without_an_agent_gives_crash_consistency(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((16,), guest_agent=True)
    session = vm.start()
    assert find_guest_agent_socket(session) == vm.agent_path
    with VmBackup(session, short_tmp / "s", freeze_timeout_s=0.3) as backup:
        assert backup.consistency.value == "crash-consistent"
        assert "guest-sync-delimited" in backup.consistency_detail
        assert "no answer" in backup.consistency_detail
        assert len(backup.exports) == 1


def test_vm_without_agent_channel_has_none(make_vm: Callable[..., Vm]) -> None:
    session = make_vm((16,)).start()
    assert find_guest_agent_socket(session) is None


def test_leftovers_of_a_dead_backup_process_are_removed_and_the_chain_repaired(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((64, 32))
    session = vm.start()
    scratch = short_tmp / "scratch"
    before = node_names(session)
    with VmBackup(session, scratch, find_guest_agent=False) as first:
        expected = chain(first)
    vm.write(session, "vda", 0x01, 1 * MiB, 64 * KiB)
    # A backup process that dies inside its backup: no teardown at all.
    VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False).__enter__()
    session.close()
    session = vm.connect()
    vm.write(session, "vda", 0x02, 3 * MiB, 64 * KiB)
    with pytest.raises(SourceError, match=f"bitmap {re.escape(expected['vda'])} is busy"):
        VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False).__enter__()
    removed = remove_backup_leftovers(session, scratch)
    assert len([r for r in removed if r.startswith("export ")]) == 2
    assert "NBD server" in removed
    assert len([r for r in removed if r.startswith("file ")]) == 2
    assert_torn_down(session, before, scratch)
    with VmBackup(session, scratch, expected_bitmaps=expected, find_guest_agent=False) as backup:
        vda, vdb = backup.exports
        assert vda.bitmap_context == f"qemu:dirty-bitmap:{expected['vda']}"
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [
            (1 * MiB, 64 * KiB), (3 * MiB, 64 * KiB),
        ]  # fmt: skip
        assert vdb.bitmap_context is not None
        assert dirty_ranges(vdb.uri, vdb.bitmap_context) == []
    assert remove_backup_leftovers(session, scratch) == []


def test_raw_disk_gets_an_in_memory_chain(make_vm: Callable[..., Vm], short_tmp: Path) -> None:
    vm = make_vm((16,), fmt="raw")
    session = vm.start()
    with VmBackup(session, short_tmp / "s", find_guest_agent=False) as first:
        expected = chain(first)
    assert generations(expected) == {"vda": "stratavault-1"}
    (disk,) = list_vm_disks(session)
    bitmap = disk.bitmap(expected["vda"])
    assert disk.format == "raw" and bitmap is not None and not bitmap.persistent
    vm.write(session, "vda", 0x01, 5 * MiB, 64 * KiB)
    with VmBackup(session, short_tmp / "s", expected_bitmaps=expected) as second:
        vda = second.exports[0]
        assert vda.bitmap_context is not None
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [(5 * MiB, 64 * KiB)]
        ref = reference_image(short_tmp / "ref.qcow2", 16 * MiB, [(0x01, 5 * MiB, 64 * KiB)])
        assert compare(vda.uri, ref).returncode == 0


def test_disk_on_a_backing_chain_is_exported_whole(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    base = reference_image(short_tmp / "base.qcow2", 32 * MiB, [(0x0B, 0, 2 * MiB)])
    vm = make_vm((32,), backing=base)
    session = vm.start()
    vm.write(session, "vda", 0x0C, 1 * MiB, 64 * KiB)
    with VmBackup(session, short_tmp / "s", find_guest_agent=False) as backup:
        vda = backup.exports[0]
        vm.write(session, "vda", 0x0D, 0, 64 * KiB)
        ref = reference_image(
            short_tmp / "ref.qcow2", 32 * MiB, [(0x0B, 0, 2 * MiB), (0x0C, 1 * MiB, 64 * KiB)]
        )
        assert compare(vda.uri, ref).returncode == 0
        assert data_ranges(vda.uri)[0] == (0, 2 * MiB)


def test_disk_grown_between_backups(make_vm: Callable[..., Vm], short_tmp: Path) -> None:
    vm = make_vm((16,))
    session = vm.start()
    with VmBackup(session, short_tmp / "s", find_guest_agent=False) as first:
        expected = chain(first)
    session.execute("block_resize", {"node-name": "disk0", "size": 24 * MiB})
    vm.write(session, "vda", 0x01, 20 * MiB, 64 * KiB)  # in the new part
    with VmBackup(session, short_tmp / "s", expected_bitmaps=expected) as second:
        vda = second.exports[0]
        assert vda.size_bytes == 24 * MiB
        assert vda.bitmap_context is not None
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [(20 * MiB, 64 * KiB)]
        ref = reference_image(short_tmp / "ref.qcow2", 24 * MiB, [(0x01, 20 * MiB, 64 * KiB)])
        assert compare(vda.uri, ref).returncode == 0


def test_the_project_nbd_client_reads_the_exports(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    """The pieces the backup job combines: these exports, read with stratavault.nbd."""
    vm = make_vm((16,))
    session = vm.start()
    with VmBackup(session, short_tmp / "s", find_guest_agent=False) as first:
        expected = chain(first)
    vm.write(session, "vda", 0x42, 3 * MiB, 128 * KiB)
    with VmBackup(session, short_tmp / "s", expected_bitmaps=expected) as second:
        vda = second.exports[0]
        assert vda.bitmap_context is not None
        vm.write(session, "vda", 0x43, 3 * MiB, 64 * KiB)  # after the point in time
        client = nbd.connect(vda.uri, meta_contexts=[vda.bitmap_context, nbd.BASE_ALLOCATION])
        try:
            assert client.size_bytes == vda.size_bytes and client.read_only
            dirty = [e for e in client.extents(vda.bitmap_context) if e.flags & 1]
            assert [(e.offset, e.length) for e in dirty] == [(3 * MiB, 128 * KiB)]
            assert client.read(3 * MiB, 128 * KiB) == b"\x42" * (128 * KiB)
        finally:
            client.close()
