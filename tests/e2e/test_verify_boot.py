"""verify --boot with the real test guest (TCG): a backup of a bootable guest passes, booted
isolated (no network) from served disks; a backup of a guest whose root filesystem was
destroyed fails within the timeout (exit 16) with its console log kept."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stratavault.errors import VerificationFailedError
from tests.e2e.conftest import Cli
from tests.e2e.test_instant import backup_paused_guest
from tests.guest.build import INIT_MARKER, ROOT_FAILED_MARKER, GuestImage
from tests.sources import vm_harness

pytestmark = pytest.mark.infra("qemu")
short_tmp = vm_harness.short_tmp
NETWORK = ("-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,id=nic0")


def test_a_bootable_backup_passes_isolated(
    cli: Cli, test_guest_image: GuestImage, short_tmp: Path
) -> None:
    backup_paused_guest(cli, test_guest_image, short_tmp, extra_args=NETWORK)
    logs = short_tmp / "logs"
    result = cli("verify", "latest", "--boot", "--timeout", "240", "--log-dir", logs, "--json")
    assert result.code == 0, result.err
    (doc,) = result.json_lines()
    assert doc["passed"] is True
    assert doc["reason"] == "the guest agent answered guest-ping"
    console = Path(str(doc["console_log"]))
    assert console.parent == logs and INIT_MARKER in console.read_text()
    (command,) = logs.glob("command-*.txt")
    assert "-netdev" not in command.read_text() and "-nic none" in command.read_text()
    assert "netdev=" not in command.read_text()
    assert cli("check", "--read-data").code == 0  # nothing written to the repository


def test_an_unbootable_backup_fails_in_time(
    cli: Cli, test_guest_image: GuestImage, short_tmp: Path
) -> None:
    backup_paused_guest(cli, test_guest_image, short_tmp, broken=True)
    logs = short_tmp / "logs"
    started = time.monotonic()
    result = cli(
        "verify", "latest", "--boot", "--timeout", "120", "--expect", "init started",
        "--log-dir", logs,
    )  # fmt: skip
    assert time.monotonic() - started < 120
    assert result.code == VerificationFailedError.exit_code == 16, result.err
    assert "FAILED" in result.out and "console log" in result.err
    (console,) = logs.glob("console-*.log")
    assert ROOT_FAILED_MARKER in console.read_text()
    assert INIT_MARKER not in console.read_text()
