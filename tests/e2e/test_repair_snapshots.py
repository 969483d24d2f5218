"""`repair snapshots` on real damage: a flipped byte in a file chunk and in a folder's
tree blob, a deleted or truncated data pack. After the repair `check --read-data` passes
and the repaired snapshots restore everything that was still readable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stratavault.errors import DataDamagedError
from stratavault.repo import ChunkInfo, Repository
from stratavault.snapshot import find_snapshot, resolve_path
from stratavault.storage import LocalStorage
from tests.e2e.conftest import Cli
from tests.e2e.test_check import _flip_byte

MiB = 1 << 20


def _tree(src: Path) -> None:
    (src / "a").mkdir(parents=True)
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a" / "big.bin").write_bytes(os.urandom(8 * MiB))  # several chunks (at most 4 MiB each)
    (src / "two.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "deep" / "three.bin").write_bytes(os.urandom(200_000))
    (src / "sub" / "note.txt").write_text("hello\n")


def _open(cli: Cli) -> Repository:
    passphrase = cli.password_file.read_bytes().rstrip(b"\n")
    return Repository.open(LocalStorage(cli.repo), passphrase, cache_dir=None)


def _locate(cli: Cli, path: Path) -> tuple[list[tuple[ChunkInfo | None, int]], ChunkInfo | None]:
    """Where the latest snapshot keeps ``path``: its chunks (file) or its listing (folder)."""
    with _open(cli) as repo:
        snap = find_snapshot(repo, "latest")
        _where, node = resolve_path(repo, snap, str(path))
        assert node is not None
        runs = [(repo.chunk_info(c) if c else None, n) for c, n in node.content]
        return runs, repo.chunk_info(node.subtree) if node.subtree else None


def _damage_blob(cli: Cli, info: ChunkInfo) -> None:
    _flip_byte(cli.repo / info.pack, info.offset + info.stored_bytes // 2)


def _objects(cli: Cli) -> dict[str, bytes]:
    return {
        str(p.relative_to(cli.repo)): p.read_bytes()
        for p in cli.repo.rglob("*")
        if p.is_file() and "locks" not in p.parts
    }


def _snapshot_ids(cli: Cli) -> set[str]:
    found = cli("snapshots", "--json").json()
    assert isinstance(found, list)
    return {str(s["id"]) for s in found}


def test_undamaged_repository_has_nothing_to_do(cli: Cli, tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    cli("init")
    assert cli("backup", "files", tmp_path / "src", "-q").code == 0
    before = _objects(cli)
    result = cli("repair", "snapshots", "--forget", "--json")
    assert result.code == 0, result.err
    doc = result.json_lines()[-1]
    assert doc["snapshots"] == [] and doc["damages"] == 0 and doc["snapshots_checked"] == 1
    assert "nothing to do" in cli("repair", "snapshots").out
    assert _objects(cli) == before


def test_damaged_chunk_and_folder_are_removed_and_the_rest_restores(
    cli: Cli, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    _tree(src)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    (src / "new.txt").write_text("second backup\n")
    assert cli("backup", "files", src, "-q").code == 0  # shares the damaged objects
    originals = _snapshot_ids(cli)
    big_runs, _ = _locate(cli, src / "a" / "big.bin")
    assert len(big_runs) >= 2
    damaged_info = big_runs[1][0]
    assert damaged_info is not None
    _damage_blob(cli, damaged_info)
    _, sub_tree = _locate(cli, src / "sub")
    assert sub_tree is not None
    _damage_blob(cli, sub_tree)
    assert cli("check", "--read-data").code == DataDamagedError.exit_code

    # A dry run reports and changes nothing.
    before = _objects(cli)
    dry = cli("repair", "snapshots", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    report = dry.json_lines()[-1]
    assert report["dry_run"] and len(report["snapshots"]) == 2
    assert all(s["new_id"] is None for s in report["snapshots"])
    assert _objects(cli) == before

    # Only the newest, original kept: the older one is still damaged.
    newest = cli("snapshots", "--json").json()[-1]["id"]
    one = cli("repair", "snapshots", newest[:10], "--json")
    assert one.code == 0, one.err
    (repaired,) = one.json_lines()[-1]["snapshots"]
    assert repaired["original"] == newest and not repaired["forgotten"]
    removed = {Path(r["path"]): r["error"] for r in repaired["removed"]}
    assert set(removed) == {src / "a" / "big.bin", src / "sub"}
    assert "replaced by zeros" in removed[src / "a" / "big.bin"]
    assert "empty folder" in removed[src / "sub"]
    assert _snapshot_ids(cli) == originals | {repaired["new_id"]}
    assert cli("check").code == DataDamagedError.exit_code

    # All the rest, originals forgotten: check passes.
    rest = cli("repair", "snapshots", "--forget", "--json")
    assert rest.code == 0, rest.err
    fixed = rest.json_lines()[-1]["snapshots"]
    assert {s["original"] for s in fixed} == originals  # the newest's original was kept
    assert all(s["forgotten"] for s in fixed)
    assert not originals & _snapshot_ids(cli)
    check = cli("check", "--read-data")
    assert check.code == 0, check.out + check.err

    # The mark: tag and record naming the original.
    doc = cli("cat", "snapshot", repaired["new_id"]).json()
    assert isinstance(doc, dict)
    assert "repaired" in doc["tags"] and doc["repair"]["original"] == newest
    assert {Path(r["path"]) for r in doc["repair"]["removed"]} == set(removed)

    # Everything readable restores; the lost chunk comes back as zeros in place.
    target = tmp_path / "t"
    restore = cli("restore", repaired["new_id"], "--target", target, "--verify")
    assert restore.code == 0, restore.err
    out = target / src.relative_to("/")
    assert (out / "two.bin").read_bytes() == (src / "two.bin").read_bytes()
    assert (out / "new.txt").read_text() == "second backup\n"
    assert sorted(os.listdir(out / "sub")) == []
    want, got = (src / "a" / "big.bin").read_bytes(), (out / "a" / "big.bin").read_bytes()
    assert len(got) == len(want)
    offset = 0
    for i, (_info, length) in enumerate(big_runs):
        piece = got[offset : offset + length]
        assert piece == (bytes(length) if i == 1 else want[offset : offset + length])
        offset += length


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_lost_data_pack(cli: Cli, tmp_path: Path, how: str) -> None:
    src = tmp_path / "src"
    _tree(src)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    runs, _ = _locate(cli, src / "a" / "big.bin")
    first = runs[0][0]
    assert first is not None
    pack = cli.repo / first.pack
    if how == "delete":
        pack.unlink()
        # The documented order: the index forgets the lost pack first, then its chunks are
        # unindexed, which repair snapshots treats as lost.
        assert cli("repair", "index").code == 0
    else:
        with open(pack, "r+b") as f:
            f.truncate(pack.stat().st_size // 2)
    result = cli("repair", "snapshots", "--forget", "--json")
    assert result.code == 0, result.err
    (repaired,) = result.json_lines()[-1]["snapshots"]
    paths = {Path(r["path"]) for r in repaired["removed"]}
    assert src / "a" / "big.bin" in paths
    files = {p for p in src.rglob("*") if p.is_file()}
    if how == "delete":
        assert paths == files  # all file data was in that pack
    else:  # the truncated pack's first chunks are used still, but its header is gone:
        damaged = cli("check", "--read-data")
        assert damaged.code == 12 and "header" in damaged.out, damaged.out
        # prune rewrites the readable chunks of the pack, now partly unused, into a new one
        assert cli("prune", "--max-unused", "0%").code == 0
    assert cli("check", "--read-data").code == 0
    target = tmp_path / "t"
    assert cli("restore", "latest", "--target", target, "--verify").code == 0
    out = target / src.relative_to("/")
    for path in files:
        restored = out / path.relative_to(src)
        assert restored.stat().st_size == path.stat().st_size
        if path not in paths:
            assert restored.read_bytes() == path.read_bytes()


def test_truncated_tree_pack_loses_the_root_listing(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    with _open(cli) as repo:
        root = find_snapshot(repo, "latest").tree
        assert root is not None
        info = repo.chunk_info(root)
    with open(cli.repo / info.pack, "r+b") as f:  # the root listing is the last tree written
        f.truncate(info.offset + 10)
    assert cli("check").code == DataDamagedError.exit_code
    result = cli("repair", "snapshots", "--forget", "--json")
    assert result.code == 0, result.err
    (repaired,) = result.json_lines()[-1]["snapshots"]
    assert [r["path"] for r in repaired["removed"]] == ["/"]
    assert "empty folder" in repaired["removed"][0]["error"]
    still = cli("check")  # no snapshot uses the truncated pack now, but it is still there
    assert still.code == DataDamagedError.exit_code and "truncated" in still.out, still.out
    assert cli("prune").code == 0  # it holds only unused data: deleted
    assert cli("check", "--read-data").code == 0
    target = tmp_path / "t"
    assert cli("restore", "latest", "--target", target).code == 0
    assert not target.exists() or os.listdir(target) == []


def test_unreadable_snapshot_object_is_left_to_forget(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    (src / "new.txt").write_text("second\n")
    assert cli("backup", "files", src, "-q").code == 0
    first = cli("snapshots", "--json").json()[0]["id"]
    _flip_byte(cli.repo / "snapshots" / first, 40)
    result = cli("repair", "snapshots", "--forget", "--json")
    assert result.code == 0, result.err
    assert result.json_lines()[-1]["snapshots"] == []  # nothing readable is damaged
    check = cli("check", "--json")
    assert check.code == DataDamagedError.exit_code
    assert any(first in d["object"] for d in check.json_lines()[-1]["damages"])
