"""A backup onto a full disk fails cleanly (exit 14), the repository stays consistent, and
the next backup with space succeeds. Uses a real size-limited tmpfs (root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stratavault.errors import StorageFullError
from tests.e2e.conftest import Cli


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.infra("root and tmpfs")
def test_full_disk_fails_cleanly_and_next_backup_succeeds(
    cli: Cli, tmp_path: Path, small_disk: Path
) -> None:
    cli.env["STRATAVAULT_REPOSITORY"] = str(small_disk / "repo")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(1 << 20))
    assert cli("init").code == 0
    full = cli("backup", "files", src)
    assert full.code == StorageFullError.exit_code, full.err
    assert "space" in full.err.lower() or "full" in full.err.lower()
    assert cli("snapshots", "--json").json() == []
    assert cli("check", "--read-data").code == 0  # consistent: nothing half-written is used
    leftovers = [p for p in (small_disk / "repo").rglob(".tmp-*")]
    assert leftovers == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    cli("unlock")
    again = cli("backup", "files", src, "--json")
    assert again.code == 0, again.err
    assert cli("check", "--read-data").code == 0
    target = tmp_path / "restored"
    assert cli("restore", "latest", "--target", target, "--verify").code == 0
