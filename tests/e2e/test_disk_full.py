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
from tests.tmpfs import mounted_tmpfs


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", "3m") as mount:
        yield mount


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
    assert "cannot read" not in full.err  # the repository failed, not the files
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


@pytest.mark.infra("root and tmpfs")
def test_restore_onto_a_full_disk_names_the_files_and_counts_only_what_was_written(
    cli: Cli, tmp_path: Path, small_disk: Path
) -> None:
    """Files that could not be written are issues, keep the marks of unfinished files (mode
    0600, the restore's time) and are not counted as restored; the others are whole."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(b"fits\n")
    for i in range(3):
        (src / f"big{i}").write_bytes(os.urandom(2 << 20))
    os.chmod(src / "big0", 0o644)
    os.utime(src / "big0", (1_000_000_000, 1_000_000_000))
    assert cli("init").code == 0
    assert cli("backup", "files", src, "-q").code == 0
    done = cli("restore", f"latest:{src}", "--target", small_disk / "r", "--json")
    assert done.code == 1, done.err
    summary = done.json_lines()[-1]
    failed = {i["path"] for i in summary["issues"] if "No space left" in i["error"]}
    assert failed and len(summary["issues"]) == len(failed), summary
    assert summary["files"] == 4 - len(failed)
    written = sum(p.stat().st_blocks * 512 for p in (small_disk / "r").iterdir())
    assert summary["bytes_written"] <= written
    for name in ("small", "big0", "big1", "big2"):  # which fail depends on the workers' order
        st = (small_disk / "r" / name).stat()
        if name in failed:
            assert st.st_mode & 0o777 == 0o600 and st.st_mtime > 1_000_000_000, name
        else:
            assert (small_disk / "r" / name).read_bytes() == (src / name).read_bytes(), name
            assert st.st_mode & 0o777 == (src / name).stat().st_mode & 0o777, name
