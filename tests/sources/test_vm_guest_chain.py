"""A chain of incrementals of a real Linux guest that keeps writing (tests/guest, TCG).

Each backup's full copy is compared with the previous copy patched with only the extents
the frozen bitmap marks dirty: equal means the bitmap chain lost no write between the two
points in time, while the guest's writer kept going.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from stratavault import nbd
from stratavault.sources import DiskExport, QmpSession, VmBackup
from tests.guest.fixtures import MakeGuest
from tests.sources.vm_harness import MiB, short_tmp

__all__ = ["short_tmp"]  # fixtures

pytestmark = pytest.mark.infra("qemu")


def patch_dirty(export: DiskExport, target: Path) -> int:
    """Write the export's dirty extents into ``target``; returns the bytes written."""
    assert export.bitmap_context is not None
    client = nbd.connect(export.uri, meta_contexts=[export.bitmap_context])
    written = 0
    try:
        with target.open("r+b") as out:
            for extent in client.extents(export.bitmap_context):
                if extent.flags & 1:
                    out.seek(extent.offset)
                    out.write(client.read(extent.offset, extent.length))
                    written += extent.length
    finally:
        client.close()
    return written


def test_incrementals_of_a_writing_guest_lose_no_write(
    make_guest: MakeGuest, short_tmp: Path
) -> None:
    vm = make_guest(append=["sv.writer=1", "sv.writer_interval=0.02"])
    vm.wait_for("stratavault-guest: writer started")
    scratch = short_tmp / "s"
    expected: dict[str, str] = {}
    previous: Path | None = None
    with QmpSession(vm.qmp_path, timeout_s=30) as session:
        for n in range(3):
            with VmBackup(
                session, scratch, expected_bitmaps=expected, freeze_timeout_s=60
            ) as backup:
                assert backup.consistency_text == "application-consistent (fs frozen)"
                vdb = next(e for e in backup.exports if e.device == "vdb")
                full = short_tmp / f"full{n}.raw"
                subprocess.run(["qemu-img", "convert", "-O", "raw", vdb.uri, str(full)], check=True)
                if previous is None:
                    assert vdb.bitmap_context is None
                else:
                    assert full.read_bytes() != previous.read_bytes()  # the guest wrote
                    patched = short_tmp / f"patched{n}.raw"
                    shutil.copyfile(previous, patched)
                    written = patch_dirty(vdb, patched)
                    assert 0 < written < 16 * MiB  # the writer wrote, far less than the disk
                    assert patched.read_bytes() == full.read_bytes()
                    patched.unlink()
                    previous.unlink()
                expected = {e.device: e.new_bitmap for e in backup.exports if e.new_bitmap}
            subprocess.run(["e2fsck", "-fn", str(full)], check=True, capture_output=True)
            previous = full
            time.sleep(0.5)  # the writer goes on between backups
