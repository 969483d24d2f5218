"""End to end: init, backup, change, backup, restore and compare byte and metadata."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.e2e.fstree import NON_UTF8, allocated_bytes, build_sample_tree, describe


def _restore_root(target: Path, source: Path) -> Path:
    return target / source.relative_to("/")


def test_backup_change_backup_restore_roundtrip(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_sample_tree(src)
    assert cli("init").code == 0
    first = cli("backup", "files", src, "--tag", "one", "--json")
    assert first.code == 0, first.err
    summary1 = first.json_lines()[-1]
    state1 = describe(src)

    (src / "docs" / "a.txt").write_text("changed content\n")
    (src / "new-file").write_bytes(os.urandom(70_000))
    shutil.rmtree(src / "many")
    second = cli("backup", "files", src, "--json")
    assert second.code == 0, second.err
    summary2 = second.json_lines()[-1]
    assert summary2["files_unmodified"] >= 5
    assert summary2["files_new"] == 1 and summary2["files_changed"] == 1
    # Only the changed and new data travels the second time.
    assert summary2["bytes_added_stored"] < 200_000 < summary1["bytes_added_stored"]

    snaps = cli("snapshots", "--json").json()
    assert isinstance(snaps, list) and len(snaps) == 2
    assert snaps[1]["parent"] == snaps[0]["id"]

    for snap, state in ((snaps[0]["id"], state1), (snaps[1]["id"], describe(src))):
        target = tmp_path / f"restore-{snap[:8]}"
        result = cli("restore", snap, "--target", target, "--verify")
        assert result.code == 0, result.err
        assert describe(_restore_root(target, src)) == state
    restored_sparse = _restore_root(tmp_path / f"restore-{snaps[1]['id'][:8]}", src) / "sparse.img"
    assert allocated_bytes(restored_sparse) < 4 << 20  # holes came back as holes


def test_restore_subpath_include_exclude(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_sample_tree(src)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    target = tmp_path / "sub"
    assert cli("restore", f"latest:{src}/docs", "--target", target).code == 0
    assert (target / "a.txt").read_text() == "hello world\n" * 100
    assert (target / "deep" / "er" / "b.bin").exists()
    only = tmp_path / "only"
    assert cli("restore", "latest", "--target", only, "--include", "*.txt").code == 0
    found = {p.name for p in only.rglob("*") if p.is_file()}
    assert found == {"a.txt", os.fsdecode(NON_UTF8)}
    assert not any(p.name.endswith(".bin") for p in only.rglob("*"))
    excl = tmp_path / "excl"
    assert cli("restore", "latest", "--target", excl, "--exclude", "many").code == 0
    assert not list(excl.rglob("many"))
    assert list(excl.rglob("big.bin"))


@pytest.mark.parametrize("pattern", ["{src}/docs", "docs", "{src}", "src"])
def test_patterns_that_match_the_restored_path_or_a_folder_above_it(
    cli: Cli, tmp_path: Path, pattern: str
) -> None:
    """What is below a matching path matches too, also when the match is the path restored
    (``SNAP:PATH``) or a folder above it."""
    src = tmp_path / "src"
    src.mkdir()
    build_sample_tree(src)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    pattern = pattern.format(src=src)
    inc, exc = tmp_path / "inc", tmp_path / "exc"
    done = cli("restore", f"latest:{src}/docs", "--target", inc, "--include", pattern)
    assert done.code == 0, done.err
    assert (inc / "a.txt").read_text() == "hello world\n" * 100
    assert (inc / "deep" / "er" / "b.bin").stat().st_size == 3 << 20
    one = cli("restore", f"latest:{src}/docs/a.txt", "--target", inc / "one", "-i", pattern)
    assert one.code == 0 and (inc / "one" / "a.txt").exists()
    done = cli("restore", f"latest:{src}/docs", "--target", exc, "--exclude", pattern)
    assert done.code == 0, done.err
    assert not exc.exists() or not any(exc.iterdir())
    one = cli("restore", f"latest:{src}/docs/a.txt", "--target", exc / "one", "-e", pattern)
    assert one.code == 0 and not (exc / "one" / "a.txt").exists()
    other = cli("restore", f"latest:{src}/docs/a.txt", "--target", exc / "no", "-i", "nomatch")
    assert other.code == 0 and not (exc / "no" / "a.txt").exists()


def test_a_path_through_a_symlinked_folder_is_backed_up_as_given(cli: Cli, tmp_path: Path) -> None:
    """``backup files lnk/f`` (like ``/bin/true`` on Debian 12, /bin -> usr/bin): the
    snapshot holds a folder ``lnk`` with ``f`` in it, not the link without its file."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "f").write_bytes(b"through the link\n")
    os.chmod(real / "sub", 0o750)
    (tmp_path / "lnk").symlink_to("real")
    assert cli("init").code == 0
    assert cli("backup", "files", tmp_path / "lnk" / "sub" / "f", "-q").code == 0
    by_path = {e["path"]: e for e in cli("ls", "latest", "--json").json_lines()}
    assert by_path[str(tmp_path / "lnk")]["type"] == "dir"
    assert by_path[str(tmp_path / "lnk" / "sub")]["mode"] & 0o777 == 0o750
    assert by_path[str(tmp_path / "lnk" / "sub" / "f")]["size"] == 17
    target = tmp_path / "out"
    assert cli("restore", f"latest:{tmp_path}/lnk/sub/f", "--target", target).code == 0
    assert (target / "f").read_bytes() == b"through the link\n"
    whole = tmp_path / "whole"
    assert cli("restore", "latest", "--target", whole).code == 0
    restored = whole / tmp_path.relative_to("/") / "lnk"
    assert restored.is_dir() and not restored.is_symlink()
    assert (restored / "sub" / "f").read_bytes() == b"through the link\n"


def test_listing_commands_and_json(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_sample_tree(src)
    cli("init")
    cli("backup", "files", src, "-q")
    (src / "added.txt").write_text("x")
    cli("backup", "files", src, "-q")
    entries = cli("ls", f"latest:{src}", "--json").json_lines()
    paths = {e["path"] for e in entries}
    assert f"{src}/docs/a.txt" in paths and f"{src}/link-rel" in paths
    long = cli("ls", "latest", "-l")
    assert "-> docs/a.txt" in long.out
    snaps = cli("snapshots", "--json").json()
    assert isinstance(snaps, list)
    diff = cli("diff", snaps[0]["id"], snaps[1]["id"], "--json").json_lines()
    changes = [d for d in diff if d["message_type"] == "change"]
    assert [(c["modifier"], c["path"]) for c in changes] == [("+", f"{src}/added.txt")]
    stats = cli("stats", "latest", "--json").json()
    assert isinstance(stats, dict) and stats["snapshots"] == 2
    assert stats["snapshot"]["files"] >= 40
    cat = cli("cat", "snapshot", snaps[0]["id"][:10])
    assert snaps[0]["tree"] in cat.out
    config = cli("cat", "config")
    assert '"version"' in config.out or "version" in config.out
    blob = cli("cat", "blob", snaps[0]["tree"])  # a tree is a blob too
    assert blob.code == 0 and blob.out
    absent = cli("cat", "blob", "ab" * 32)
    assert absent.code == 1 and "no chunk" in absent.err, absent.err  # not damage (12)


def test_incomplete_snapshot_exit_code(cli: Cli, tmp_path: Path) -> None:
    """Run as an unprivileged user that cannot read one folder: exit 4, the rest saved."""
    base = Path(tempfile.mkdtemp(prefix="sv-incomplete-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        src = base / "src"
        (src / "locked").mkdir(parents=True)
        (src / "ok.txt").write_text("fine")
        (src / "locked" / "secret").write_text("unreadable to others")
        os.chmod(src / "locked", 0o700)
        user = Cli(base, cli._capsys)
        user.env["STRATAVAULT_REPOSITORY"] = str(base / "repo")
        assert user("init").code == 0
        for dirpath, _dirs, files in os.walk(base):
            if dirpath.startswith(str(src)):
                continue
            shutil.chown(dirpath, user="nobody")
            for f in files:
                shutil.chown(os.path.join(dirpath, f), user="nobody")
        result = user.subprocess("backup", "files", src, "--json", as_user="nobody")
        assert result.code == 4, result.err
        summary = result.json_lines()[-1]
        assert summary["incomplete"] is True
        assert any(e["path"].endswith("locked") for e in summary["errors"])
        listing = user("ls", "latest", "--json").json_lines()
        assert any(e["path"].endswith("ok.txt") for e in listing)
    finally:
        shutil.rmtree(base)


def test_backup_excludes_tags_and_host_filters(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "cache").mkdir(parents=True)
    (src / "keep.txt").write_text("keep")
    (src / "skip.tmp").write_text("skip")
    (src / "cache" / "big").write_bytes(b"x" * 1000)
    (src / "notes.log").write_text("log")
    excludes = tmp_path / "excludes"
    excludes.write_text("# comment\n*.log\n")
    cli("init")
    result = cli(
        "backup",
        "files",
        src,
        "--exclude",
        "*.tmp",
        "--exclude",
        f"{src}/cache",
        "--exclude-file",
        excludes,
        "--tag",
        "nightly",
        "--tag",
        "db",
        "--host",
        "alpha",
        "-q",
    )
    assert result.code == 0, result.err
    assert cli("backup", "files", src, "--host", "beta", "-q").code == 0
    names = {Path(str(e["path"])).name for e in cli("ls", "latest", "--json").json_lines()}
    listed = cli("snapshots", "--host", "alpha", "--json").json()
    assert isinstance(listed, list) and len(listed) == 1
    assert listed[0]["tags"] == ["nightly", "db"]
    first = cli("ls", listed[0]["id"], "--json").json_lines()
    first_names = {Path(str(e["path"])).name for e in first}
    assert "keep.txt" in first_names
    assert not {"skip.tmp", "cache", "notes.log"} & first_names
    assert {"skip.tmp", "cache", "notes.log"} <= names  # the second backup had no excludes
    tagged = cli("snapshots", "--tag", "nightly,db", "--json").json()
    assert isinstance(tagged, list) and [s["host"] for s in tagged] == ["alpha"]
    assert cli("snapshots", "--tag", "nightly,other", "--json").json() == []
    # Commas separate tags at backup time too (as in restic)
    assert cli("backup", "files", src, "--tag", "x, y", "--tag", "z,", "-q").code == 0
    (xyz,) = cli("snapshots", "--tag", "y", "--json").json()  # type: ignore[misc]
    assert xyz["tags"] == ["x", "y", "z"]


def test_metadata_only_change_deep_in_tree_is_seen(cli: Cli, tmp_path: Path) -> None:
    """An unchanged folder reuses the parent's tree; a changed one must not."""
    src = tmp_path / "src"
    deep = src / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "f").write_text("same content")
    (src / "other").mkdir()
    (src / "other" / "g").write_text("untouched")
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    os.chmod(deep / "f", 0o600)
    os.setxattr(src / "other", "user.tag", b"new")
    second = cli("backup", "files", src, "--json")
    assert second.code == 0
    summary = second.json_lines()[-1]
    assert (summary["files_unmodified"], summary["files_changed"]) == (1, 1)  # chmod moves ctime
    target = tmp_path / "restored"
    assert cli("restore", "latest", "--target", target).code == 0
    assert describe(target / src.relative_to("/")) == describe(src)
    snaps = cli("snapshots", "--json").json()
    assert isinstance(snaps, list)
    diff = cli("diff", snaps[0]["id"], snaps[1]["id"], "--json").json_lines()
    assert [(d["modifier"], d["path"]) for d in diff if d["message_type"] == "change"] == [
        ("U", f"{deep}/f")
    ]


def test_json_progress_has_totals_and_summary(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(1000 + i))
    cli("init")
    lines = cli("backup", "files", src, "--json").json_lines()
    status = [line for line in lines if line["message_type"] == "status"]
    assert status, "no progress lines"
    last = status[-1]
    assert last["files_total"] == 20 and last["files_done"] == 20
    assert last["bytes_total"] == last["bytes_done"] == sum(1000 + i for i in range(20))
    assert lines[-1]["message_type"] == "summary"
    quiet = cli("backup", "files", src, "--quiet")
    assert quiet.code == 0 and quiet.out == ""
    with open(src / "sparse", "wb") as f:  # a restore's progress counts holes as done too
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data in the middle")
    assert cli("backup", "files", src, "-q").code == 0
    restored = cli("restore", "latest", "--target", tmp_path / "out", "--json").json_lines()
    last = [line for line in restored if line["message_type"] == "status"][-1]
    assert last["bytes_done"] == last["bytes_total"] > 64 << 20, last


def test_restore_verify_reports_content_that_differs(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--verify re-reads what was written; a byte that differs on disk is reported."""
    from stratavault.sources import FsRestorer

    src = tmp_path / "src"
    src.mkdir()
    (src / "good").write_bytes(b"fine" * 1000)
    (src / "bad").write_bytes(b"data" * 1000)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    real = FsRestorer.read_back

    def flipped(self: FsRestorer, path: Sequence[bytes | str]) -> Iterator[bytes]:
        for block in real(self, path):
            yield (b"X" + block[1:]) if os.fsdecode(path[-1]) == "bad" else block

    monkeypatch.setattr(FsRestorer, "read_back", flipped)
    result = cli("restore", "latest", "--target", tmp_path / "t", "--verify", "--json")
    assert result.code == 1
    issues = result.json_lines()[-1]["issues"]
    assert [Path(i["path"]).name for i in issues] == ["bad"]
    assert "differs" in issues[0]["error"]


def test_forget_with_policy_dry_run_then_real(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cli("init")
    for i in range(4):
        (src / f"f{i}").write_text(str(i))
        tags = ["release"] if i == 0 else []
        args = [a for t in tags for a in ("--tag", t)]
        assert cli("backup", "files", src, "-q", *args).code == 0
    before = cli("snapshots", "--json").json()
    assert isinstance(before, list) and len(before) == 4
    dry = cli("forget", "--keep-last", "2", "--keep-tag", "release", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    decisions = dry.json_lines()[-1]["groups"][0]["snapshots"]
    assert [(d["keep"], d["reasons"]) for d in decisions] == [
        (True, ["last"]),
        (True, ["last"]),
        (False, []),
        (True, ["tag"]),
    ]
    assert len(cli("snapshots", "--json").json()) == 4  # a dry run removes nothing
    assert cli("forget", "--keep-last", "2", "--keep-tag", "release", "-q").code == 0
    after = cli("snapshots", "--json").json()
    assert [s["id"] for s in after] == [before[0]["id"], before[2]["id"], before[3]["id"]]
    target = tmp_path / "restored"
    assert cli("restore", before[0]["id"], "--target", target).code == 0  # kept data is intact
    assert cli("forget", "--keep-within", "7x").code == 2
    assert cli("forget", "--group-by", "colour").code == 2


def test_protected_snapshots_survive_forget(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cli("init")
    for i in range(3):
        (src / f"f{i}").write_text(str(i))
        assert cli("backup", "files", src, "-q").code == 0
    oldest = cli("snapshots", "--json").json()[0]  # type: ignore[index]
    protected = cli("protect", oldest["id"][:8], "--json").json_lines()[-1]
    assert protected["protected"] is True and protected["id"] != oldest["id"]
    dry = cli("forget", "--keep-last", "1", "--dry-run", "--json").json_lines()[-1]
    reasons = {d["id"]: d["reasons"] for d in dry["groups"][0]["snapshots"]}
    assert reasons[protected["id"]] == ["protected"]
    assert cli("forget", "--keep-last", "1", "-q").code == 0
    left = cli("snapshots", "--json").json()
    assert isinstance(left, list) and len(left) == 2
    assert cli("unprotect", protected["id"][:8], "-q").code == 0
    assert cli("forget", "--keep-last", "1", "-q").code == 0
    assert len(cli("snapshots", "--json").json()) == 1  # type: ignore[arg-type]


def test_control_characters_in_names_are_escaped_in_text_output(cli: Cli, tmp_path: Path) -> None:
    """A newline in a name does not make two lines of `ls` or `diff` (JSON keeps it)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "two\nlines").write_text("x")
    (src / "tab\there").write_text("y")
    assert cli("init").code == 0
    assert cli("backup", "files", src, "-q").code == 0
    listed = cli("ls", "latest").out.splitlines()
    assert f"{src}/two\\nlines" in listed and f"{src}/tab\\there" in listed
    (src / "two\nlines").write_text("changed")
    assert cli("backup", "files", src, "-q").code == 0
    snaps = cli("snapshots", "--json").json()
    assert isinstance(snaps, list)
    diff = cli("diff", snaps[0]["id"], snaps[1]["id"]).out.splitlines()
    assert f"M  {src}/two\\nlines" in diff
    names = {e["path"] for e in cli("ls", "latest", "--json").json_lines()}
    assert f"{src}/two\nlines" in names


def test_sockets_are_backed_up_as_entries_and_named_when_left_out(cli: Cli, tmp_path: Path) -> None:
    import socket

    src = Path(tempfile.mkdtemp(prefix="sv-sock-", dir="/tmp"))  # a short path for the socket
    try:
        (src / "f").write_text("x")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(src / "app.sock"))
            assert cli("init").code == 0
            assert cli("backup", "files", src, "-q").code == 0
        kinds = {
            Path(e["path"]).name: e["type"] for e in cli("ls", "latest", "--json").json_lines()
        }
        assert kinds["app.sock"] == "socket"
        text = cli("restore", f"latest:{src}", "--target", tmp_path / "t")
        assert text.code == 0 and "left out 1 sockets" in text.out, text.out
        res = cli("restore", f"latest:{src}", "--target", tmp_path / "j", "--json")
        assert res.json_lines()[-1]["skipped"] == ["app.sock"]
        assert (tmp_path / "j" / "f").exists() and not (tmp_path / "j" / "app.sock").exists()
    finally:
        shutil.rmtree(src)
