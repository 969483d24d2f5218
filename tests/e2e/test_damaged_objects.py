"""Damaged snapshot objects and packs no snapshot uses: named precisely, the rest usable."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stratavault.errors import DataDamagedError
from tests.e2e.conftest import Cli


def _two_snapshots(cli: Cli, tmp_path: Path) -> tuple[str, str, Path]:
    assert cli("init").code == 0
    ids = []
    for name in ("a", "b"):
        src = tmp_path / name
        src.mkdir()
        (src / "data").write_bytes(os.urandom(200_000))
        res = cli("backup", "files", src, "--json")
        assert res.code == 0, res.err
        ids.append(str(res.json_lines()[-1]["snapshot_id"]))
    return ids[0], ids[1], tmp_path / "b"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_snapshot_object(cli: Cli, tmp_path: Path, damage: str) -> None:
    bad, good, good_src = _two_snapshots(cli, tmp_path)
    obj = cli.repo / "snapshots" / bad
    raw = bytearray(obj.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    else:
        del raw[len(raw) // 2 :]
    obj.write_bytes(bytes(raw))

    listing = cli("snapshots")
    assert listing.code == DataDamagedError.exit_code
    assert bad[:8] in listing.err and "damaged" in listing.err
    assert good[:8] in listing.out and bad[:8] not in listing.out

    check = cli("check", "--json")
    assert check.code == DataDamagedError.exit_code
    damages = check.json_lines()[-1]["damages"]
    assert [d["object"] for d in damages] == [f"snapshot {bad}"]  # type: ignore[index]

    target = tmp_path / "out"
    assert cli("restore", good, "--target", target).code == 0
    assert (target / good_src.relative_to("/") / "data").read_bytes() == (
        good_src / "data"
    ).read_bytes()

    refused = cli("prune")
    assert refused.code == DataDamagedError.exit_code and bad in refused.err

    assert cli("forget", bad[:10]).code == 0
    assert cli("check", "--read-data").code == 0
    assert cli("prune").code == 0
    assert cli("check", "--read-data").code == 0


def test_missing_pack_that_no_snapshot_uses(cli: Cli, tmp_path: Path) -> None:
    gone, _keep, _src = _two_snapshots(cli, tmp_path)
    assert cli("forget", gone).code == 0
    packs = sorted((cli.repo / "data").rglob("*"))
    packs = [p for p in packs if p.is_file()]
    checked_before = cli("check")
    assert checked_before.code == 0
    # Delete packs one at a time until one that no snapshot needs is gone.
    for pack in packs:
        saved = pack.read_bytes()
        pack.unlink()
        if cli("restore", "latest", "--target", tmp_path / f"r{pack.name}").code == 0:
            break
        pack.write_bytes(saved)
    else:
        pytest.fail("every pack is used by the kept snapshot")
    res = cli("check", "--json")
    assert res.code == DataDamagedError.exit_code
    damage = res.json_lines()[-1]["damages"][0]
    assert pack.name in damage["object"] and "missing" in damage["problem"]  # type: ignore[index]
    assert damage["snapshots"] == []  # type: ignore[index]
    assert cli("repair", "index").code == 0
    assert cli("check", "--read-data").code == 0


def test_deleted_packs_are_damage_not_a_storage_failure(cli: Cli, tmp_path: Path) -> None:
    """A pack the index names but the backend lacks: check reports it (trees included),
    restore --ignore-errors restores the rest."""
    src = tmp_path / "src"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        (src / name / "data").write_bytes(os.urandom(300_000))
    assert cli("init").code == 0
    assert cli("backup", "files", src).code == 0
    packs = sorted((p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=os.path.getsize)
    tree_pack, data_pack = packs[0], packs[-1]  # listings are small, file data is large
    data_pack.unlink()
    res = cli("check")
    assert res.code == DataDamagedError.exit_code and data_pack.name in res.out + res.err
    out = tmp_path / "out"
    res = cli("restore", "latest", "--target", out, "--ignore-errors")
    assert res.code == 1 and "data" in res.err  # the files listed as incomplete
    tree_pack.unlink()
    res = cli("check")
    assert res.code == DataDamagedError.exit_code, res.err
    assert tree_pack.name in res.out + res.err


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_or_deleted_key_file(cli: Cli, tmp_path: Path, damage: str) -> None:
    _two_snapshots(cli, tmp_path)
    (key,) = (cli.repo / "keys").iterdir()
    saved = key.read_bytes()
    if damage == "delete":
        key.unlink()
    else:
        key.write_bytes(saved[:50])
    res = cli("snapshots")
    assert res.code == DataDamagedError.exit_code
    assert ("no key slots" in res.err) if damage == "delete" else (key.name in res.err)
    key.write_bytes(saved)  # put back: everything works again
    assert cli("check", "--read-data").code == 0


def test_next_backup_reads_again_what_a_lost_pack_held(cli: Cli, tmp_path: Path) -> None:
    """Unchanged files and disk chunks whose data went with a lost pack are read again
    by the next backup (not reused from the parent), so it is complete."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(1 << 20))
    assert cli("init").code == 0
    assert cli("backup", "files", src, "-q").code == 0
    assert cli("backup", "image", image, "-q").code == 0
    for pack in [p for p in (cli.repo / "data").rglob("*") if p.is_file()]:
        if pack.stat().st_size > 600_000:  # file or disk data, not listings
            pack.unlink()
    assert cli("repair", "index").code == 0
    files = cli("backup", "files", src, "--json")
    assert files.code == 0, files.err
    summary = files.json_lines()[-1]
    assert summary["files_unmodified"] == 0 and summary["bytes_read"] == 3 * 300_000
    disk = cli("backup", "image", image, "--json")
    assert disk.code == 0, disk.err
    assert disk.json_lines()[-1]["bytes_read"] == 1 << 20
    assert cli("check", "--read-data").code == 0
    out = tmp_path / "out"
    assert cli("restore", str(summary["snapshot_id"]), "--target", out, "--verify").code == 0
    assert all((out / p.relative_to("/")).read_bytes() == p.read_bytes() for p in src.iterdir())
    assert cli("restore", "disk", "latest", "--to", tmp_path / "d.raw").code == 0
    assert (tmp_path / "d.raw").read_bytes() == image.read_bytes()


def test_bitmap_incremental_reads_again_what_a_lost_pack_held(cli: Cli, tmp_path: Path) -> None:
    """A qcow2's next backup reads only what its dirty bitmap marks, except the chunks
    the parent had in a pack that was lost since: those are read again."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1 << 20))
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, image], check=True)
    assert cli("init").code == 0
    args = ("backup", "image", image, "--format", "qcow2", "--json")
    assert cli(*args).code == 0
    packs = sorted((p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=os.path.getsize)
    packs[-1].unlink()  # the disk's data
    assert cli("repair", "index").code == 0
    again = cli(*args)
    assert again.code == 0, again.err
    summary = again.json_lines()[-1]
    assert summary["disks"][0]["bitmap"] and summary["bytes_read"] == 1 << 20
    assert cli("check", "--read-data").code == 0
    assert cli("restore", "disk", "latest", "--to", tmp_path / "d.raw").code == 0
    assert (tmp_path / "d.raw").read_bytes() == raw.read_bytes()


def test_disk_incremental_goes_on_beside_a_damaged_snapshot(cli: Cli, tmp_path: Path) -> None:
    """A damaged snapshot of something else does not stop a qcow2's bitmap incremental:
    only the parent is read (a damaged one of the same disk would only make it read more)."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1 << 20))
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, image], check=True)
    assert cli("init").code == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    files = cli("backup", "files", src, "--json")
    assert files.code == 0
    args = ("backup", "image", image, "--format", "qcow2", "--json")
    assert cli(*args).code == 0
    damaged = cli.repo / "snapshots" / str(files.json_lines()[-1]["snapshot_id"])
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    again = cli(*args)
    assert again.code == 0, again.err
    summary = again.json_lines()[-1]
    assert summary["disks"][0]["bitmap"] and summary["bytes_read"] == 0


def test_damaged_pack_header_is_found_and_repair_index_keeps_its_chunks(
    cli: Cli, tmp_path: Path
) -> None:
    """A flipped byte in a pack's header (its tail): `check --read-data` names it although
    every chunk authenticates; `repair index` cannot read it but keeps the pack's entries
    from the old index (exit 12, the damage stays), so nothing is lost."""
    _bad, _good, src = _two_snapshots(cli, tmp_path)
    packs = sorted((p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=os.path.getsize)
    pack = packs[-1]
    raw = bytearray(pack.read_bytes())
    raw[-10] ^= 0x01  # in the sealed header, before the 4-byte length trailer
    pack.write_bytes(bytes(raw))

    check = cli("check", "--read-data", "--json")
    assert check.code == DataDamagedError.exit_code, check.out
    doc = check.json_lines()[-1]
    (damage,) = doc["damages"]
    assert damage["object"] == f"pack data/{pack.parent.name}/{pack.name}"
    assert "header" in damage["problem"] and damage["snapshots"]
    assert doc["chunks_read"] == doc["chunks"]  # every chunk itself is fine

    repair = cli("repair", "index", "--json")
    assert repair.code == DataDamagedError.exit_code, repair.err
    report = repair.json_lines()[-1]
    assert report["unreadable_packs"] == report["kept_packs"] == [damage["object"][5:]]
    assert "entries in the old index were kept" in repair.err
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", out, "--verify").code == 0
    assert (out / src.relative_to("/") / "data").read_bytes() == (src / "data").read_bytes()
    assert cli("check").code == 0  # every chunk is in the index


def test_latest_when_the_only_snapshots_are_damaged_names_the_damage(
    cli: Cli, tmp_path: Path
) -> None:
    assert cli("init").code == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    done = cli("backup", "files", src, "--json")
    sid = str(done.json_lines()[-1]["snapshot_id"])
    obj = cli.repo / "snapshots" / sid
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 1
    obj.write_bytes(bytes(raw))
    result = cli("restore", "latest", "--target", tmp_path / "out")
    assert result.code == DataDamagedError.exit_code, result.err
    assert sid[:12] in result.err and "damaged" in result.err


def test_plain_check_finds_a_truncated_pack_without_reading_it(cli: Cli, tmp_path: Path) -> None:
    _bad, _good, _src = _two_snapshots(cli, tmp_path)
    assert cli("check").code == 0
    packs = sorted((p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=os.path.getsize)
    with open(packs[-1], "r+b") as f:
        f.truncate(packs[-1].stat().st_size // 2)
    check = cli("check", "--json")
    assert check.code == DataDamagedError.exit_code, check.out
    (damage,) = check.json_lines()[-1]["damages"]
    assert damage["object"].endswith(packs[-1].name) and "truncated" in damage["problem"]
    assert damage["snapshots"], "the snapshot that uses it is named"
