"""The test guest itself: it builds, boots under QEMU, answers its agent, freezes, writes, and
a broken boot disk does not boot."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.guest.build import (
    DEFAULT_CACHE,
    HOST_TOOLS,
    INIT_MARKER,
    READY_MARKER,
    ROOT_FAILED_MARKER,
    GuestBuildError,
    GuestImage,
    break_root_filesystem,
    cache_dir,
    check_host_tools,
    ensure_image,
    make_data_disk,
)
from tests.guest.fixtures import MakeGuest
from tests.guest.vm import GuestError, GuestVM

pytestmark = pytest.mark.infra("qemu")


def debugfs_cat(image: Path, path: str) -> bytes:
    """A file's content read from an ext4 image without mounting it."""
    done = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    )
    return done.stdout


def test_guest_boots_and_its_init_speaks_first(
    make_guest: MakeGuest, test_guest_image: GuestImage, tmp_path: Path
) -> None:
    # A boot disk grown to 64 GiB (sparse, as issue 5's benchmark uses) boots the same.
    boot = test_guest_image.boot_overlay(tmp_path / "big.qcow2", size=64 << 30)
    vm = make_guest(wait=None, disks=[boot, make_data_disk(tmp_path / "d.qcow2")])
    to_init = vm.wait_for(INIT_MARKER, 120)
    to_ready = vm.wait_for(READY_MARKER, 60)
    print(f"boot under TCG: init marker {to_init:.1f} s, ready {to_ready:.1f} s")
    ours = [line for line in vm.console().splitlines() if line.startswith("stratavault-")]
    assert ours[0] == INIT_MARKER
    assert "stratavault-guest: data disk /dev/vdb mounted on /data" in ours
    assert "failed" not in vm.console()


def test_guest_agent_answers_ping_runs_commands_and_shuts_down(
    running_guest: GuestVM, tmp_path: Path
) -> None:
    running_guest.ga_ping()
    assert running_guest.sh("cat /proc/sys/kernel/hostname").strip() == "sv-guest"
    mounts = running_guest.sh("cat /proc/mounts")
    assert "/dev/vdb /data ext4 rw" in mounts
    res = running_guest.exec(["/bin/sh", "-c", "cat; echo oops >&2; exit 3"], stdin=b"in")
    assert (res.exitcode, res.stdout, res.stderr) == (3, b"in", b"oops\n")
    running_guest.write_file("/data/told/by-agent.txt", b"told\n")
    running_guest.ga("guest-shutdown")
    assert running_guest.proc is not None
    assert running_guest.proc.wait(60) == 0
    raw = tmp_path / "data.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", tmp_path / "data0.qcow2", raw], check=True)
    assert debugfs_cat(raw, "/told/by-agent.txt") == b"told\n"


def _writes(vm: GuestVM, device: str) -> int:
    """Write requests the guest has sent to virtio-blk device `device` (QEMU's counters)."""
    stats = vm.qmp("query-blockstats")
    (entry,) = [s for s in stats if f"/{device}/" in s.get("qdev", "")]
    return int(entry["stats"]["wr_operations"])


def test_fsfreeze_stops_guest_writes_until_thaw(make_guest: MakeGuest) -> None:
    vm = make_guest(append=["sv.writer=1", "sv.writer_interval=0.05"])
    vm.wait_for("stratavault-guest: writer started")
    vm.ga_ping()
    # The data disk's device sees the writer's writes...
    before = _writes(vm, "vdb")
    time.sleep(1.5)
    assert _writes(vm, "vdb") > before
    # ... and none while the guest is frozen (root and /data: two filesystems).
    assert vm.ga("guest-fsfreeze-freeze") == 2
    try:
        assert vm.ga("guest-fsfreeze-status") == "frozen"
        frozen = _writes(vm, "vdb")
        time.sleep(1.5)
        assert _writes(vm, "vdb") == frozen
    finally:
        assert vm.ga("guest-fsfreeze-thaw") == 2
    assert vm.ga("guest-fsfreeze-status") == "thawed"
    time.sleep(1.5)
    assert _writes(vm, "vdb") > frozen


def test_guest_writes_land_on_the_data_disk(
    make_guest: MakeGuest, test_guest_image: GuestImage, tmp_path: Path
) -> None:
    boot = test_guest_image.boot_overlay(tmp_path / "boot.qcow2")
    data = make_data_disk(tmp_path / "data.raw", {"seed/hello.txt": b"hello\n"}, fmt="raw")
    disks = [boot, data]
    vm = make_guest(disks=disks, append=["sv.writer=1", "sv.writer_interval=0.05"])
    vm.wait_for("stratavault-guest: writer started")
    payload = os.urandom(100_000)
    vm.write_file("/data/told/payload.bin", payload)
    assert vm.sh("cat /data/seed/hello.txt") == "hello\n"
    time.sleep(1)
    # Freezing checkpoints the ext4 journal, so the image is readable without a journal replay.
    vm.ga("guest-fsfreeze-freeze")
    vm.kill()

    assert debugfs_cat(data, "/told/payload.bin") == payload
    counter = int(debugfs_cat(data, "/writer/counter"))
    assert counter > 3
    latest = debugfs_cat(data, f"/writer/file-{counter % 8}")
    assert len(latest) == 65536
    assert latest.startswith(f"stratavault-writer {counter}\n".encode())


def test_unbootable_disk_does_not_reach_the_init_marker(
    make_guest: MakeGuest, test_guest_image: GuestImage, tmp_path: Path
) -> None:
    boot = test_guest_image.boot_overlay(tmp_path / "broken.qcow2")
    break_root_filesystem(boot)
    vm = make_guest(disks=[boot], wait=None)
    started = time.monotonic()
    with pytest.raises(GuestError, match="QEMU exited"):
        vm.wait_for(INIT_MARKER, 120)
    assert ROOT_FAILED_MARKER in vm.console()
    assert INIT_MARKER not in vm.console()
    assert time.monotonic() - started < 60


def test_build_into_an_empty_cache_is_fast_and_reuses_debs(tmp_path: Path) -> None:
    shared = cache_dir() / "debs"
    ensure_image()  # the machine's .debs are there
    fresh = tmp_path / "cache"
    (fresh / "debs").mkdir(parents=True)
    for deb in shared.glob("*.deb"):
        try:
            os.link(deb, fresh / "debs" / deb.name)
        except OSError:
            shutil.copyfile(deb, fresh / "debs" / deb.name)
    started = time.monotonic()
    image = ensure_image(fresh)
    took = time.monotonic() - started
    print(f"build with cached .debs: {took:.1f} s")
    assert took < 60
    assert image.root.parent == fresh
    assert all(p.stat().st_size > 0 for p in (image.kernel, image.initrd, image.boot_disk))
    assert ensure_image(fresh) == image  # second call: reused, not rebuilt
    assert DEFAULT_CACHE.name == "stratavault-test-guest"


def test_a_missing_host_tool_is_named_with_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    check_host_tools()  # this machine has them all
    monkeypatch.setitem(HOST_TOOLS, "sv-no-such-tool", "sv-no-such-package")
    with pytest.raises(GuestBuildError, match=r"sv-no-such-tool \(Debian package sv-no-such-"):
        check_host_tools()


def test_without_apt_lists_the_cached_build_of_this_recipe_is_used(
    test_guest_image: GuestImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_lists() -> None:
        raise GuestBuildError("look up package versions: not found")

    monkeypatch.setattr("tests.guest.build.resolve_packages", no_lists)
    assert ensure_image(test_guest_image.root.parent) == test_guest_image
    with pytest.raises(GuestBuildError, match="not found"):
        ensure_image(test_guest_image.root.parent / "empty-cache")
