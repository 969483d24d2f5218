"""Exit codes, key slots, interruption and hostile snapshots, through the real command line."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from stratavault.errors import (
    IncompleteSnapshotError,
    PassphraseError,
    RepositoryLockedError,
    RepositoryNotFoundError,
)
from stratavault.jobs import RestoreOptions, restore_files
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import Node, Snapshot, save_snapshot, save_tree
from stratavault.storage import LocalStorage
from stratavault.storage._local import TEMP_PREFIX
from tests.e2e.conftest import Cli


def test_exit_codes_are_distinct() -> None:
    codes = {
        c.exit_code
        for c in (
            PassphraseError,
            RepositoryNotFoundError,
            RepositoryLockedError,
            IncompleteSnapshotError,
        )
    }
    assert len(codes) == 4 and 0 not in codes and 1 not in codes


def test_wrong_passphrase_and_missing_repository(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").code == 0
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase")
    result = cli("snapshots", "--password-file", wrong)
    assert result.code == PassphraseError.exit_code
    assert "passphrase" in result.err
    missing = cli("snapshots", "-r", tmp_path / "nowhere")
    assert missing.code == RepositoryNotFoundError.exit_code
    assert "nowhere" in missing.err
    no_pass = cli.subprocess("snapshots", env={"STRATAVAULT_PASSWORD_FILE": ""})
    assert no_pass.code == PassphraseError.exit_code


def test_password_command_and_key_management(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").code == 0
    other = tmp_path / "other-pass"
    other.write_text("second passphrase")
    assert cli("key", "add").code == 2  # no terminal and no new passphrase: refused
    assert cli("key", "add", "--new-password-file", other).code == 0
    keys = cli("key", "list", "--json").json()
    assert isinstance(keys, list) and len(keys) == 2
    assert sum(k["current"] for k in keys) == 1
    via_cmd = cli("snapshots", "--password-command", f"cat {other}")
    assert via_cmd.code == 0, via_cmd.err
    # Remove the first slot while using the second.
    first = next(k["id"] for k in keys if k["current"])
    removed = cli("key", "remove", first[:12], "--password-file", other)
    assert removed.code == 0, removed.err
    assert cli("snapshots").code == PassphraseError.exit_code
    third = tmp_path / "third"
    third.write_text("third passphrase")
    assert cli("key", "passwd", "--password-file", other, "--new-password-file", third).code == 0
    assert cli("snapshots", "--password-file", other).code == PassphraseError.exit_code
    assert cli("snapshots", "--password-file", third).code == 0


def test_hostile_snapshot_cannot_write_outside_target(tmp_path: Path) -> None:
    """A snapshot made by a malicious client: names with .., /, and a symlinked parent."""
    storage = LocalStorage(tmp_path / "repo")
    outside = tmp_path / "outside"
    outside.mkdir()
    with Repository.init(storage, b"pw", cache_dir=None, kdf=KdfParams.fast()) as repo:
        data = b"evil payload"
        cid = repo.chunk_id(data)
        repo.add_chunk(cid, data)
        evil = [
            Node(name="..", type="file", mode=0o644, size=len(data), content=[(cid, len(data))]),
            Node(
                name=f"..{os.sep}..{os.sep}escaped",
                type="file",
                mode=0o644,
                size=len(data),
                content=[(cid, len(data))],
            ),
            Node(
                name=str(outside / "abs"),
                type="file",
                mode=0o644,
                size=len(data),
                content=[(cid, len(data))],
            ),
            Node(name="d", type="symlink", mode=0o777, link_target=str(outside)),
        ]
        inner = save_tree(
            repo,
            [Node(name="x", type="file", mode=0o644, size=len(data), content=[(cid, len(data))])],
        )
        evil.append(Node(name="d", type="dir", mode=0o755, subtree=inner))
        evil.append(
            Node(name="ok", type="file", mode=0o644, size=len(data), content=[(cid, len(data))])
        )
        import datetime as dt

        snap = Snapshot(
            time=dt.datetime.now(dt.UTC), host="evil", paths=["/"], tree=save_tree(repo, evil)
        )
        save_snapshot(repo, snap)
        target = tmp_path / "target"
        result = restore_files(repo, snap, RestoreOptions(target=target))
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escaped").exists()
    assert (target / "ok").read_bytes() == b"evil payload"
    assert len(result.issues) >= 3
    assert any(".." in path for path, _ in result.issues)


def _tree(root: Path, files: int, size: int) -> None:
    rnd = random.Random(5)
    for i in range(files):
        sub = root / f"d{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_bytes(rnd.randbytes(size))


def _start_backup(cli: Cli, src: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("stratavault")
    # The upload limit makes the backup last long enough to be interrupted in the middle.
    return subprocess.Popen(
        [str(exe), "backup", "files", str(src), "--json", "--limit-upload", "40000"],
        env={**os.environ, **cli.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_packs(proc: subprocess.Popen[bytes], repo: Path, count: int) -> None:
    """Wait until ``count`` packs have landed, while the backup still runs."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "backup ended before it was interrupted"
        landed = [p for p in (repo / "data").rglob("*") if p.is_file()]
        if sum(1 for p in landed if not p.name.startswith(TEMP_PREFIX)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("no packs landed within 60 s")


def test_ctrl_c_leaves_consistent_repository_and_next_backup_reuses(
    cli: Cli, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    _tree(src, 160, 1 << 20)
    cli("init")
    proc = _start_backup(cli, src)
    _wait_for_packs(proc, cli.repo, 2)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    assert cli("snapshots", "--json").json() == []
    landed = sum(p.stat().st_size for p in (cli.repo / "data").rglob("*") if p.is_file())
    second = cli("backup", "files", src, "--json")
    assert second.code == 0, second.err
    summary = second.json_lines()[-1]
    # What landed before Ctrl-C (two packs at least) is reused; the rest is uploaded again.
    assert summary["bytes_added_stored"] < (161 << 20) - landed < 140 << 20


def test_ctrl_c_does_not_wait_for_an_upload_held_back_by_the_limit(
    cli: Cli, tmp_path: Path
) -> None:
    """8 MiB at 64 KiB/s: the pack's upload would take two minutes; Ctrl-C ends the
    command at once (it used to flush first) and the next backup completes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "random").write_bytes(os.urandom(8 << 20))
    cli("init")
    exe = Path(sys.executable).with_name("stratavault")
    proc = subprocess.Popen(
        [str(exe), "backup", "files", str(src), "--limit-upload", "64", "--json"],
        env={**os.environ, **cli.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # progress lines: the file has been read once it is done
        if json.loads(line).get("files_done") == 1:
            break
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert not list((cli.repo / "locks").iterdir())
    assert cli("check").code == 0
    assert cli("backup", "files", src).code == 0
    assert cli("check", "--read-data").code == 0


def test_sigkill_mid_backup_then_resume(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, 160, 1 << 20)
    cli("init")
    proc = _start_backup(cli, src)
    _wait_for_packs(proc, cli.repo, 3)
    proc.kill()
    proc.wait(timeout=30)
    assert cli("snapshots", "--json").json() == []
    cli("unlock")
    second = cli("backup", "files", src, "--json")
    assert second.code == 0, second.err
    summary = second.json_lines()[-1]
    assert summary["bytes_added_stored"] < 130 << 20  # the 3 packs that had landed were reused
    target = tmp_path / "restore"
    assert cli("restore", "latest", "--target", target, "--verify").code == 0


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def test_helper_processes_die_with_a_killed_backup(cli: Cli, tmp_path: Path) -> None:
    """Worker and read-ahead processes must not outlive a backup killed with SIGKILL."""
    src = tmp_path / "src"
    _tree(src, 2400, 20_000)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    exe = Path(sys.executable).with_name("stratavault")
    proc = subprocess.Popen(
        [str(exe), "backup", "files", str(src), "--force", "--limit-upload", "2000"],
        env={**os.environ, **cli.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    helpers: set[int] = set()
    while time.monotonic() < deadline and len(helpers) < 2:
        assert proc.poll() is None, "backup ended before worker processes started"
        helpers |= _children(proc.pid)
        time.sleep(0.05)
    assert len(helpers) >= 2, "no helper processes were started"
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (alive := {p for p in helpers if _running(p)}):
        time.sleep(0.1)
    assert not alive, f"helper processes survived: {alive}"


def _running(pid: int) -> bool:
    """True if the process exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_ctrl_c_during_restore_stops_promptly(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src, 200, 1 << 20)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    target = tmp_path / "target"
    exe = Path(sys.executable).with_name("stratavault")
    # 200 MiB at 8 MiB/s: the restore would take ~25 s; Ctrl-C after ~1 s.
    proc = subprocess.Popen(
        [str(exe), "restore", "latest", "--target", str(target), "--limit-download", "8192"],
        env={**os.environ, **cli.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not any(target.rglob("*")):  # Ctrl-C once files are being written
        assert proc.poll() is None, "restore ended before it was interrupted"
        assert time.monotonic() < deadline, "restore wrote nothing in 30 s"
        time.sleep(0.05)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # Workers stop after the pack read they are in (one 16 MiB read each at 8 MiB/s here),
    # not after the whole batch.
    assert time.monotonic() - started < 10.0
    assert target.exists()


def test_bad_options_are_usage_errors(cli: Cli, tmp_path: Path) -> None:
    cli("init")
    assert cli.subprocess("backup", "files", tmp_path, "--compression", "40").code == 2
    assert cli.subprocess("restore", "latest").code == 2  # --target is required
    assert cli("ls", "not-hex!").code == 2
    for empty in (["restore", "latest", "--target", ""], ["backup", "files", ""]):
        refused = cli(*empty)  # an empty path is not the current folder
        assert refused.code == 2 and "empty path" in refused.err, refused.err


def test_tampered_key_file_and_newer_format_have_their_own_exit_codes(
    cli: Cli, tmp_path: Path
) -> None:
    import json

    from stratavault.errors import KeyFileDamagedError, UnsupportedFormatError

    cli("init")
    key = next((cli.repo / "keys").iterdir())
    original = key.read_bytes()
    doc = json.loads(original)
    doc["body"]["host"] = "someone-else"  # changes the content, not the checksum
    key.chmod(0o644)
    key.write_text(json.dumps(doc))
    tampered = cli("snapshots")
    assert tampered.code == KeyFileDamagedError.exit_code, tampered.err
    assert "key" in tampered.err
    key.write_bytes(original)
    assert cli("snapshots").code == 0
    config = cli.repo / "config"
    conf = json.loads(config.read_text())
    conf["version"] = 99
    config.chmod(0o644)
    config.write_text(json.dumps(conf))
    newer = cli("snapshots")
    assert newer.code == UnsupportedFormatError.exit_code, newer.err
    assert "99" in newer.err or "version" in newer.err
    conf["version"] = 1
    for bad_id, code in ((conf["id"][:-1] + "z", 12), (conf["id"][::-1], 3)):
        config.write_text(json.dumps({**conf, "id": bad_id}))
        damaged = cli("snapshots")  # not hex: damage; hex but another: no slot opens
        assert damaged.code == code, damaged.err
        assert ("not 64 hex digits" if code == 12 else "bound to the config's id") in damaged.err


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, ()))
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], ()))
    return found


def test_sigterm_during_a_password_command_ends_what_it_started(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").code == 0
    marker = tmp_path / "started"
    command = f"touch {marker}; sleep 300; echo never"  # the shell cannot exec sleep
    exe = Path(sys.executable).with_name("stratavault")
    env = {**os.environ, **cli.env, "STRATAVAULT_PASSWORD_FILE": ""}
    proc = subprocess.Popen(
        [str(exe), "snapshots", "--password-command", command],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not marker.exists() or not _descendants(proc.pid)[1:]:
        assert proc.poll() is None and time.monotonic() < deadline, "the command never ran"
        time.sleep(0.02)
    started = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 10  # SIGKILL takes effect at once, not synchronously
    while running := [pid for pid in started if _running(pid)]:
        assert time.monotonic() < deadline, f"left running: {running}"
        time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_output_closed_by_its_reader_ends_quietly(cli: Cli, tmp_path: Path) -> None:
    """`stratavault ls | head`: no "broken pipe" message, exit 141 (as a tool that SIGPIPE
    ended); the same error on anything else than standard output stays an error."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_text(str(i))
    assert cli("init").code == 0
    assert cli("backup", "files", src, "-q").code == 0
    exe = Path(sys.executable).with_name("stratavault")
    proc = subprocess.Popen(
        [str(exe), "ls", "latest"], env={**os.environ, **cli.env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the command writes anything
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert err == b""
