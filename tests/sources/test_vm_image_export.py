"""Stopped VMs and disk images served through qemu-storage-daemon, with bitmap chains for qcow2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from stratavault.errors import SourceError
from stratavault.sources import ImageExport, VmBackup
from tests.sources.vm_harness import (
    KiB,
    MiB,
    Vm,
    compare,
    dirty_ranges,
    make_vm,
    plain,
    reference_image,
    short_tmp,
)

__all__ = ["make_vm", "short_tmp"]  # fixtures

pytestmark = pytest.mark.infra("qemu")


def offline_write(image: Path, pattern: int, offset: int, length: int) -> None:
    """A write to a stopped image (its enabled persistent bitmaps record it)."""
    subprocess.run(
        ["qemu-io", "-c", f"write -P {pattern:#x} {offset} {length}", str(image)],
        check=True,
        capture_output=True,
    )


def stored_bitmaps(image: Path) -> list[str]:
    """Names of the persistent bitmaps in a qcow2 file (fails if something holds its lock)."""
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(image)],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


def test_stopped_qcow2_gets_incrementals_from_its_bitmap_chain(short_tmp: Path) -> None:
    image = reference_image(short_tmp / "disk.qcow2", 32 * MiB, [(0x01, 0, 1 * MiB)])
    scratch = short_tmp / "s"
    with ImageExport(image, scratch) as first:
        assert first.export is not None
        assert first.export.bitmap_context is None
        expected = first.export.new_bitmap
        assert expected is not None and re.fullmatch(r"stratavault-1-[0-9a-f]{12}", expected)
        assert compare(first.export.uri, reference_image(
            short_tmp / "ref1.qcow2", 32 * MiB, [(0x01, 0, 1 * MiB)]
        )).returncode == 0  # fmt: skip
    assert stored_bitmaps(image) == [expected]  # stored, and the daemon is gone
    offline_write(image, 0x02, 4 * MiB, 128 * KiB)
    with ImageExport(image, scratch, expected_bitmap=expected) as second:
        assert second.export is not None
        assert second.export.bitmap_context == f"qemu:dirty-bitmap:{expected}"
        assert dirty_ranges(second.export.uri, second.export.bitmap_context) == [
            (4 * MiB, 128 * KiB)
        ]
        assert plain(second.export.new_bitmap) == "stratavault-2"
    assert stored_bitmaps(image) == [second.export.new_bitmap]
    assert list(scratch.iterdir()) == []


def test_failed_image_backup_merges_the_bitmap_back(short_tmp: Path) -> None:
    image = reference_image(short_tmp / "disk.qcow2", 32 * MiB, [])
    with ImageExport(image, short_tmp / "s") as first:
        assert first.export is not None
        expected = first.export.new_bitmap
    assert plain(expected) == "stratavault-1"
    offline_write(image, 0x02, 2 * MiB, 64 * KiB)
    with (
        pytest.raises(RuntimeError, match="repository unreachable"),
        ImageExport(image, short_tmp / "s", expected_bitmap=expected),
    ):
        raise RuntimeError("repository unreachable")
    assert stored_bitmaps(image) == [expected]
    with ImageExport(image, short_tmp / "s", expected_bitmap=expected) as again:
        assert again.export is not None and again.export.bitmap_context is not None
        assert dirty_ranges(again.export.uri, again.export.bitmap_context) == [(2 * MiB, 64 * KiB)]


@pytest.mark.parametrize("fmt", ["raw", "vmdk", "vhdx", "vdi", "qcow2"])
def test_every_image_format_is_served_read_only_in_full(fmt: str, short_tmp: Path) -> None:
    writes = [(0x0A, 0, 64 * KiB), (0x0B, 7 * MiB, 1 * MiB)]
    ref = reference_image(short_tmp / "ref.qcow2", 16 * MiB, writes)
    image = short_tmp / f"disk.{fmt}"
    subprocess.run(["qemu-img", "convert", "-O", fmt, str(ref), str(image)], check=True)
    before = image.read_bytes()
    with ImageExport(image, short_tmp / "s", track_changes=False) as exported:
        assert exported.export is not None
        assert exported.export.bitmap_context is None
        assert exported.export.new_bitmap is None
        assert exported.export.size_bytes == 16 * MiB
        result = compare(exported.export.uri, ref)
        assert result.returncode == 0, result.stdout
    assert image.read_bytes() == before  # opened read-only: not a byte changed


def test_image_in_use_by_a_vm_is_refused_clearly(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((16,))
    vm.start()
    with pytest.raises(SourceError, match=r"opening the image .*disk0.qcow2 .*lock"):
        ImageExport(vm.disks[0], short_tmp / "s").__enter__()


def test_unsupported_format_is_refused(short_tmp: Path) -> None:
    image = short_tmp / "disk.qed"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(image), "1M"], check=True)
    with pytest.raises(SourceError, match="unsupported format 'qed'"):
        ImageExport(image, short_tmp / "s").__enter__()


def test_daemon_that_fails_at_start_up_is_reported_with_its_words(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that ends before its monitor greets: its stderr, not the QMP error."""
    image = short_tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-storage-daemon"
    fake.write_text(
        '#!/bin/sh\necho "qemu-storage-daemon: simulated failure at start-up" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(SourceError, match=r"opening the image .*simulated failure at start-up"):
        ImageExport(image, short_tmp / "s", fmt="qcow2").__enter__()


def test_daemon_slow_to_start_is_waited_for(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor is a socket pair given to the daemon: its greeting is waited for
    however late it comes (no socket file to poll for), and no socket file is made."""
    image = short_tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    real = shutil.which("qemu-storage-daemon")
    assert real is not None
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    slow = bin_dir / "qemu-storage-daemon"
    slow.write_text(f'#!/bin/sh\nsleep 0.5\nexec {real} "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with ImageExport(image, short_tmp / "s", fmt="qcow2") as export:
        assert export.export is not None
        assert not list((short_tmp / "s").glob("*.qmp"))


def test_chain_continues_from_running_to_stopped_and_back(
    make_vm: Callable[..., Vm], short_tmp: Path
) -> None:
    vm = make_vm((32,))
    session = vm.start()
    scratch = short_tmp / "s"
    with VmBackup(session, scratch, find_guest_agent=False) as live:
        expected = live.exports[0].new_bitmap
    vm.write(session, "vda", 0x01, 1 * MiB, 64 * KiB)
    vm.quit()
    with ImageExport(vm.disks[0], scratch, expected_bitmap=expected) as stopped:
        assert stopped.export is not None and stopped.export.bitmap_context is not None
        assert dirty_ranges(stopped.export.uri, stopped.export.bitmap_context) == [
            (1 * MiB, 64 * KiB)
        ]
        expected = stopped.export.new_bitmap
    session = vm.start()
    vm.write(session, "vda", 0x02, 9 * MiB, 64 * KiB)
    assert plain(expected) == "stratavault-2"
    with VmBackup(session, scratch, expected_bitmaps={"vda": expected or ""}) as live:
        vda = live.exports[0]
        assert vda.bitmap_context == f"qemu:dirty-bitmap:{expected}"
        assert dirty_ranges(vda.uri, vda.bitmap_context) == [(9 * MiB, 64 * KiB)]


def test_missing_image_is_a_clear_error(short_tmp: Path) -> None:
    with pytest.raises(SourceError, match=r"probing image .*nothere.qcow2 - .*No such file"):
        ImageExport(short_tmp / "nothere.qcow2", short_tmp / "s").__enter__()
