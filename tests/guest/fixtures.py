"""pytest fixtures for the test guest (imported by tests/conftest.py, so every test can use them).

Tests that use them need QEMU: mark them ``@pytest.mark.infra("qemu")``.

- ``test_guest_image`` (session): the built guest, from the per-machine cache or built now.
- ``make_guest`` (function): a factory that starts guests on fresh disks and always stops them.
- ``running_guest`` (function): a guest booted to its ready marker with a fresh qcow2 overlay of
  the boot disk (``disk0``/``vda``) and a fresh data disk (``disk1``/``vdb``, mounted on /data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.guest.build import READY_MARKER, GuestImage, ensure_image, make_data_disk
from tests.guest.vm import GuestVM

MakeGuest = Callable[..., GuestVM]


@pytest.fixture(scope="session")
def test_guest_image() -> GuestImage:
    """The test guest of this machine (built on first use, then cached)."""
    return ensure_image()


@pytest.fixture
def make_guest(test_guest_image: GuestImage, tmp_path: Path) -> Iterator[MakeGuest]:
    """Start a guest: ``make_guest(append=(), data_files=None, disks=None, wait=READY_MARKER)``.

    Without `disks`, the guest gets a fresh overlay of the boot disk and a fresh data disk
    holding `data_files` (None: a README); `wait=None` returns right after QEMU started.
    The console log is kept in the test's tmp_path. Every guest is stopped at teardown.
    """
    vms: list[GuestVM] = []

    def make(
        append: Sequence[str] = (),
        data_files: Mapping[str, bytes] | None = None,
        disks: Sequence[Path] | None = None,
        wait: str | None = READY_MARKER,
        timeout: float = 120.0,
    ) -> GuestVM:
        n = len(vms)
        if disks is None:
            boot = test_guest_image.boot_overlay(tmp_path / f"boot{n}.qcow2")
            disks = [boot, make_data_disk(tmp_path / f"data{n}.qcow2", data_files)]
        vm = GuestVM(test_guest_image, disks, append, log_path=tmp_path / f"serial{n}.log")
        vms.append(vm)
        vm.start()
        if wait is not None:
            vm.wait_for(wait, timeout)
        return vm

    try:
        yield make
    finally:
        for vm in vms:
            vm.cleanup()


@pytest.fixture
def running_guest(make_guest: MakeGuest) -> GuestVM:
    """A guest booted to its ready marker, with a fresh boot overlay and data disk."""
    return make_guest()
