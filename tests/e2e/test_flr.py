"""File-level restore out of disk snapshots, end to end: images made without mounting are
backed up with ``backup image``, then ``ls``/``restore``/``dump`` are compared with the
source tree. Malicious filesystems never write outside the target."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from stratavault.errors import UsageError
from stratavault.jobs import FlrRef, parse_flr_ref
from tests.e2e.conftest import Cli
from tests.sources import flr_images as img

pytestmark = pytest.mark.infra("image tools")
MiB = 1 << 20


def test_flr_references_parse() -> None:
    assert parse_flr_ref("latest:vda") == FlrRef("latest", "vda", None, "/")
    assert parse_flr_ref("3f2a:vda:p2/etc/hosts") == FlrRef("3f2a", "vda", "p2", "/etc/hosts")
    assert parse_flr_ref("3f2a:disk.img:vg0-root/") == FlrRef("3f2a", "disk.img", "vg0-root", "/")
    assert parse_flr_ref("latest:vda/home") == FlrRef("latest", "vda", None, "/home")
    for bad in ("latest", "latest:", ":vda/x"):
        with pytest.raises(UsageError):
            parse_flr_ref(bad)


def _backup(cli: Cli, image: Path) -> None:
    if not cli.repo.exists():
        assert cli("init").code == 0
    done = cli("backup", "image", image, "-q")
    assert done.code == 0, done.err


def _compare(source: Path, restored: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Same names, types, content, modes, owners, mtimes and link targets."""
    names = {str(p.relative_to(source)) for p in source.rglob("*")}
    got = {str(p.relative_to(restored)) for p in restored.rglob("*")} - set(skip)
    assert got == names
    for rel in names:
        a, b = (source / rel).lstat(), (restored / rel).lstat()
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), rel
        assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), rel
        assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
        if stat.S_ISLNK(a.st_mode):
            assert os.readlink(source / rel) == os.readlink(restored / rel)
        elif stat.S_ISREG(a.st_mode):
            assert (source / rel).read_bytes() == (restored / rel).read_bytes(), rel


@pytest.fixture
def gpt(cli: Cli, tmp_path: Path) -> Path:
    img.need_tools()
    tree = img.make_tree(tmp_path / "tree")
    img.gpt_ext4_fat(tree, tmp_path / "gpt.img")
    _backup(cli, tmp_path / "gpt.img")
    return tree


def test_ls_partitions_and_files_of_a_gpt_disk(cli: Cli, gpt: Path) -> None:
    parts = cli("ls", "latest:gpt.img", "--json")
    assert parts.code == 0, parts.err
    rows = parts.json_lines()
    assert [(r["name"], r["filesystem"], r["size"]) for r in rows] == [
        ("p1", "ext4", 40 * MiB),
        ("p2", "fat32", 40 * MiB),
    ]
    assert rows[0]["type"] == "partition"
    assert rows[0]["partition_type"] == "0fc63daf-8483-4772-8e79-3d69d8477de4"
    text = cli("ls", "latest:gpt.img")
    assert "p1" in text.out and "ext4" in text.out and "fat32" in text.out
    listing = cli("ls", "latest:gpt.img:p1/", "--json")
    assert listing.code == 0, listing.err
    entries = {e["path"]: e for e in listing.json_lines()}
    source = {"/" + str(p.relative_to(gpt)) for p in gpt.rglob("*")}
    assert set(entries) - {"/lost+found"} == source
    secret = entries["/etc/secret"]
    assert (secret["mode"], secret["uid"], secret["gid"], secret["size"]) == (0o600, 1234, 5678, 7)
    assert entries["/abs-link"]["link_target"] == "/etc/passwd"
    one_level = cli("ls", "latest:gpt.img:1/etc", "--no-recursive", "-l")
    assert one_level.code == 0, one_level.err
    assert {line.split()[-1] for line in one_level.out.splitlines()} >= {"/etc/hosts", "/etc/deep"}
    assert "/etc/deep/deeper" not in one_level.out
    # A snapshot of disks without a path still lists its disks; several filesystems need a name.
    assert "gpt.img" in cli("ls", "latest").out
    which = cli("ls", "latest:gpt.img/etc")
    assert which.code == 2 and "p1 (ext4), p2 (fat32)" in which.err
    missing = cli("ls", "latest:gpt.img:p1/nothing/here")
    assert missing.code == 1 and "/nothing" in missing.err and "no such file" in missing.err


def test_restore_ext4_and_fat_partitions(cli: Cli, gpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "ext4"
    done = cli("restore", "latest:gpt.img:p1/", "--target", target)
    assert done.code == 0, done.err
    _compare(gpt, target, skip=("lost+found",))
    assert (target / "hosts-hardlink").stat().st_ino == (target / "etc" / "hosts").stat().st_ino
    one = cli("restore", "latest:gpt.img:p1/etc/deep", "--target", tmp_path / "out" / "deep")
    assert one.code == 0, one.err
    _compare(gpt / "etc" / "deep", tmp_path / "out" / "deep")
    single = cli("restore", "latest:gpt.img:p1/etc/secret", "--target", tmp_path / "out" / "one")
    assert single.code == 0 and (tmp_path / "out" / "one" / "secret").read_text() == "s3cr3t\n"
    refused = cli("restore", "latest:gpt.img:p1/etc", "--target", tmp_path / "x", "--verify")
    assert refused.code == 2 and "file snapshots" in refused.err
    fat = tmp_path / "out" / "fat"
    done = cli("restore", "latest:gpt.img:p2/etc", "--target", fat, "--json")
    assert done.code == 0, done.err
    for rel in ("hosts", "secret", "deep/deeper/data.bin"):
        assert (fat / rel).read_bytes() == (gpt / "etc" / rel).read_bytes()
        assert (fat / rel).stat().st_mtime_ns // (2 * 10**9) == (
            (gpt / "etc" / rel).stat().st_mtime_ns // (2 * 10**9)
        )


def test_dump_is_a_tar_of_the_folder_with_metadata(cli: Cli, gpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "etc.tar"
    done = cli("dump", "latest:gpt.img:p1/etc", "--output", out)
    assert done.code == 0, done.err
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"etc"} | {
            "etc/" + str(p.relative_to(gpt / "etc")) for p in (gpt / "etc").rglob("*")
        }
        secret = members["etc/secret"]
        assert (secret.mode, secret.uid, secret.gid) == (0o600, 1234, 5678)
        assert secret.mtime == (gpt / "etc" / "secret").stat().st_mtime
        assert members["etc/up-link"].issym()
        assert members["etc/up-link"].linkname == "../../../../outside"
        data = tar.extractfile("etc/deep/deeper/data.bin")
        assert data is not None
        assert data.read() == (gpt / "etc/deep/deeper/data.bin").read_bytes()
    # To stdout, as a real process; hard links become tar hard links.
    proc = subprocess.run(
        [Path(sys.executable).with_name("stratavault"), "dump", "latest:gpt.img:p1/"],
        env={**os.environ, **cli.env},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        link = tar.getmember("./hosts-hardlink")
        assert link.islnk() and link.linkname == "./etc/hosts"


def test_mbr_logical_partition(cli: Cli, tmp_path: Path) -> None:
    img.need_tools()
    tree = img.make_tree(tmp_path / "tree")
    img.mbr_logical(tree, tmp_path / "mbr.img")
    _backup(cli, tmp_path / "mbr.img")
    rows = cli("ls", "latest:mbr.img", "--json").json_lines()
    assert [(r["name"], r["filesystem"]) for r in rows] == [
        ("p1", "fat16"),
        ("p5", "fat12"),
        ("p6", "ext4"),
    ]
    done = cli("restore", "latest:mbr.img:p6/", "--target", tmp_path / "out")
    assert done.code == 0, done.err
    _compare(tree, tmp_path / "out", skip=("lost+found",))
    fat12 = cli("restore", "latest:mbr.img:5/etc/hosts", "--target", tmp_path / "f12")
    assert (
        fat12.code == 0
        and (tmp_path / "f12" / "hosts").read_bytes() == (tree / "etc" / "hosts").read_bytes()
    )


@pytest.mark.infra("lvm2", "loop devices")
def test_lvm_logical_volume(cli: Cli, tmp_path: Path) -> None:
    img.need_tools()
    img.lvm_tools()
    tree = img.make_tree(tmp_path / "tree")
    vg = img.lvm_disk(tree, tmp_path / "lvm.img")
    _backup(cli, tmp_path / "lvm.img")
    rows = cli("ls", "latest:lvm.img", "--json").json_lines()
    assert [(r["name"], r["filesystem"]) for r in rows] == [
        ("p1", "fat16"),
        ("p2", "lvm2"),
        (f"{vg}-root", "ext4"),
        (f"{vg}-data--x", "fat16"),
    ]
    done = cli("restore", f"latest:lvm.img:{vg}-root/", "--target", tmp_path / "out")
    assert done.code == 0, done.err
    _compare(tree, tmp_path / "out", skip=("lost+found",))


@pytest.mark.infra("btrfs")
def test_btrfs_restore(cli: Cli, tmp_path: Path) -> None:
    img.need_tools()
    img.btrfs_tools()
    tree = img.make_tree(tmp_path / "tree")
    img.btrfs_image(tree, tmp_path / "btrfs.img")
    _backup(cli, tmp_path / "btrfs.img")
    done = cli("restore", "latest:btrfs.img/", "--target", tmp_path / "out")
    assert done.code == 0, done.err
    _compare(tree, tmp_path / "out")


def test_ntfs_and_large_file_streamed(cli: Cli, tmp_path: Path) -> None:
    img.need_tools()
    big = os.urandom(100 * MiB)
    img.ntfs_image({"big.bin": big, "note.txt": b"hello\n"}, tmp_path / "ntfs.img", 160)
    _backup(cli, tmp_path / "ntfs.img")
    done = cli("restore", "latest:ntfs.img/big.bin", "--target", tmp_path / "out")
    assert done.code == 0, done.err
    restored = (tmp_path / "out" / "big.bin").read_bytes()
    assert hashlib.sha256(restored).digest() == hashlib.sha256(big).digest()
    dump = cli("dump", "latest:ntfs.img:p0/note.txt", "-o", tmp_path / "n.tar")
    assert dump.code == 0, dump.err
    with tarfile.open(tmp_path / "n.tar") as tar:
        member = tar.extractfile("note.txt")
        assert member is not None and member.read() == b"hello\n"


def test_twenty_thousand_files_in_one_folder(cli: Cli, tmp_path: Path) -> None:
    img.need_tools()
    empty, some = tmp_path / "empty", tmp_path / "some"
    empty.write_bytes(b"")
    some.write_bytes(b"some content\n")
    lines = ["many d--755 1000 1000"]
    lines += [
        f"f{i:05d} ---{600 + i % 2 * 44} {i % 7} 0 {some if i % 100 == 0 else empty}"
        for i in range(20_000)
    ]
    img.xfs_image([*lines, "$"], tmp_path / "xfs.img")
    _backup(cli, tmp_path / "xfs.img")
    listing = cli("ls", "latest:xfs.img/many", "--no-recursive")
    assert listing.code == 0, listing.err
    assert len(listing.out.splitlines()) == 20_000
    done = cli("restore", "latest:xfs.img/many", "--target", tmp_path / "out", "--json")
    assert done.code == 0, done.err
    names = os.listdir(tmp_path / "out")
    assert len(names) == 20_000
    st = (tmp_path / "out" / "f00100").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 100 % 7)
    assert (tmp_path / "out" / "f00100").read_bytes() == b"some content\n"
    assert stat.S_IMODE((tmp_path / "out" / "f00101").stat().st_mode) == 0o644


def test_malicious_filesystem_writes_nothing_outside(cli: Cli, tmp_path: Path) -> None:
    img.need_tools()
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "Q9").write_text("dotdot\n")
    (tree / "aXb").write_text("slash\n")
    (tree / "d" / "f").write_text("fine\n")
    os.symlink("loop", tree / "loop")
    os.symlink("/etc", tree / "abs")
    os.symlink("../../../..", tree / "d" / "up")
    image = tmp_path / "evil.img"
    img.run("mke2fs", "-q", "-F", "-t", "ext4", "-O", "^metadata_csum", "-d", tree, image, "8M")
    img.run("debugfs", "-w", "-R", "link /d /d/back", image)
    data = bytearray(image.read_bytes())
    for old, new in ((b"\x02\x01Q9", b"\x02\x01.."), (b"\x03\x01aXb", b"\x03\x01a/b")):
        at = data.index(old)
        data[at : at + len(old)] = new
    image.write_bytes(data)
    _backup(cli, image)
    box = tmp_path / "box"
    box.mkdir()
    target = box / "target"
    done = cli("restore", "latest:evil.img/", "--target", target)
    assert done.code == 1
    assert "/'..'" in done.err and "/'a/b'" in done.err and "/d/back" in done.err
    assert os.listdir(box) == ["target"]  # nothing beside the target
    assert sorted(os.listdir(target)) == ["abs", "d", "loop", "lost+found"]
    assert (target / "d" / "f").read_text() == "fine\n"
    assert os.readlink(target / "abs") == "/etc"
    assert os.readlink(target / "d" / "up") == "../../../.."
    # Paths through symlinks resolve inside the filesystem; loops are named.
    through = cli("restore", "latest:evil.img/abs", "--target", box / "t2")
    assert through.code == 0 and os.readlink(box / "t2" / "abs") == "/etc"
    loop = cli("ls", "latest:evil.img/loop/x")
    assert loop.code == 1 and "too many symlinks" in loop.err and "/loop" in loop.err
    outside = cli("restore", "latest:evil.img/d/up/etc/passwd", "--target", box / "t3")
    assert outside.code == 1 and "no such file" in outside.err
    tar_out = tmp_path / "evil.tar"
    dump = cli("dump", "latest:evil.img/", "-o", tar_out)
    assert dump.code == 1 and "/'..'" in dump.err
    with tarfile.open(tar_out) as tar:
        for member in tar.getmembers():
            assert ".." not in member.name.split("/") and not member.name.startswith("/")
    assert sorted(os.listdir(box)) == ["t2", "target"]


def test_corrupt_superblock_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    img.need_tools()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    image = tmp_path / "bad.img"
    img.run("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image, "8M")
    with image.open("r+b") as f:
        f.seek(1024)
        f.write(b"\0" * 12)
    _backup(cli, image)
    target = tmp_path / "box" / "target"
    done = cli("restore", "latest:bad.img:p0/f", "--target", target)
    assert done.code == 1
    assert "disk bad.img partition p0" in done.err and "corrupt" in done.err
    assert not target.exists() or not os.listdir(target)
    listing = cli("ls", "latest:bad.img", "--json")
    assert listing.code == 0 and listing.json_lines()[0]["filesystem"] == "ext4"
