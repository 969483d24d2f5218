"""`check` finds damage by breaking real objects: a flipped byte, a truncated or deleted pack."""

from __future__ import annotations

import os
from pathlib import Path

from stratavault.errors import DataDamagedError
from tests.e2e.conftest import Cli


def _setup(cli: Cli, tmp_path: Path) -> tuple[Path, list[Path]]:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "one.bin").write_bytes(os.urandom(300_000))
    (src / "two.bin").write_bytes(os.urandom(300_000))
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    packs = sorted(p for p in (cli.repo / "data").rglob("*") if p.is_file())
    return src, packs


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def _data_pack(packs: list[Path]) -> Path:
    return max(packs, key=lambda p: p.stat().st_size)  # trees are in the small pack


def test_clean_repository_passes(cli: Cli, tmp_path: Path) -> None:
    _setup(cli, tmp_path)
    result = cli("check", "--read-data", "--json")
    assert result.code == 0, result.err
    doc = result.json_lines()[-1]
    assert doc["damages"] == [] and doc["chunks_read"] >= 2


def test_flipped_byte_is_found_only_when_reading_data(cli: Cli, tmp_path: Path) -> None:
    _src, packs = _setup(cli, tmp_path)
    pack = _data_pack(packs)
    _flip_byte(pack, 100)
    assert cli("check").code == 0  # structure is fine
    result = cli("check", "--read-data", "--json")
    assert result.code == DataDamagedError.exit_code
    damages = result.json_lines()[-1]["damages"]
    assert len(damages) == 1
    assert pack.name in damages[0]["object"]
    assert damages[0]["paths"] and damages[0]["paths"][0].endswith(".bin")
    # The other file still restores.
    target = tmp_path / "t"
    good = next(p for p in ("one.bin", "two.bin") if p not in damages[0]["paths"][0])
    restore = cli("restore", "latest", "--target", target, "--include", good)
    assert restore.code == 0, restore.err


def test_deleted_and_truncated_packs_are_named(cli: Cli, tmp_path: Path) -> None:
    _src, packs = _setup(cli, tmp_path)
    pack = _data_pack(packs)
    pack.unlink()
    result = cli("check", "--json")
    assert result.code == DataDamagedError.exit_code
    damage = result.json_lines()[-1]["damages"][0]
    assert pack.name in damage["object"] and "missing" in damage["problem"]
    assert len(damage["snapshots"]) == 1


def test_truncated_pack_is_found(cli: Cli, tmp_path: Path) -> None:
    _src, packs = _setup(cli, tmp_path)
    pack = _data_pack(packs)
    with open(pack, "r+b") as f:
        f.truncate(pack.stat().st_size // 2)
    result = cli("check", "--read-data", "--json")
    assert result.code == DataDamagedError.exit_code
    assert pack.name in result.json_lines()[-1]["damages"][0]["object"]


def test_restore_stops_on_damage_or_salvages_with_ignore_errors(cli: Cli, tmp_path: Path) -> None:
    src, packs = _setup(cli, tmp_path)
    pack = _data_pack(packs)
    _flip_byte(pack, 100)
    stopped = cli("restore", "latest", "--target", tmp_path / "t1")
    assert stopped.code == DataDamagedError.exit_code
    assert pack.name in stopped.err
    salvage = cli("restore", "latest", "--target", tmp_path / "t2", "--ignore-errors", "--json")
    assert salvage.code == 1
    issues = salvage.json_lines()[-1]["issues"]
    assert len(issues) == 1 and "not restored" in issues[0]["error"]
    damaged = Path(issues[0]["path"]).name
    good = next(p for p in ("a/one.bin", "two.bin") if not p.endswith(damaged))
    restored = tmp_path / "t2" / src.relative_to("/")
    assert (restored / good).read_bytes() == (src / good).read_bytes()
    assert (restored / good).stat().st_size == (src / good).stat().st_size


def test_read_data_subsets_cover_every_chunk_once(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(1 << 20))  # several packs
    cli("init")
    assert cli("backup", "files", src, "-q").code == 0
    full = cli("check", "--read-data", "--json").json_lines()[-1]
    parts = [
        cli("check", "--read-data-subset", f"{n}/3", "--json").json_lines()[-1] for n in (1, 2, 3)
    ]
    assert sum(p["chunks_read"] for p in parts) == full["chunks_read"] > 0
    every = cli("check", "--read-data-subset", "100%", "--json").json_lines()[-1]
    assert every["chunks_read"] == full["chunks_read"]
    assert cli("check", "--read-data-subset", "4/3").code == 2
    assert cli("check", "--read-data-subset", "0%").code == 2


def test_subset_parts_partition_pack_names() -> None:
    import hashlib

    from stratavault.jobs import Subset

    names = [f"data/xx/{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(300)]
    parts = [Subset.parse(f"{n}/5") for n in range(1, 6)]
    for name in names:
        assert sum(p.selects(name) for p in parts) == 1
    assert all(Subset.parse("100%").selects(n) for n in names)


def test_damaged_or_deleted_index_is_found_and_repaired(cli: Cli, tmp_path: Path) -> None:
    src, _packs = _setup(cli, tmp_path)
    index = sorted((cli.repo / "index").iterdir())
    assert index
    damaged = index[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.chmod(0o644)
    damaged.write_bytes(bytes(data))
    report = cli("check", "--json")
    assert report.code == DataDamagedError.exit_code
    objects = [d["object"] for d in report.json_lines()[-1]["damages"]]
    assert any(damaged.name in o for o in objects)
    repaired = cli("repair", "index", "--json")
    assert repaired.code == 0, repaired.err
    assert repaired.json_lines()[-1]["packs"] >= 2
    assert not damaged.exists()
    assert cli("check", "--read-data").code == 0
    # Every index object gone: the same repair brings the data back.
    for obj in (cli.repo / "index").iterdir():
        obj.unlink()
    assert cli("check", "--no-cache").code == DataDamagedError.exit_code
    assert cli("repair", "index", "--no-cache").code == 0
    target = tmp_path / "restored"
    assert cli("restore", "latest", "--target", target, "--verify").code == 0
    assert (target / src.relative_to("/") / "two.bin").read_bytes() == (
        src / "two.bin"
    ).read_bytes()
