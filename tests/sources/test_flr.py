"""Reading partitions and filesystems out of disk images (no mount): real images made by
mke2fs, mkfs.vfat/mcopy, mkntfs/ntfscp, mkfs.xfs and sfdisk, some crafted to attack."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stratavault.errors import SourceError, UnsafePathError
from stratavault.sources import (
    FlrEntry,
    FlrFilesystem,
    flr_lookup,
    flr_read,
    flr_walk,
    list_volumes,
    open_filesystem,
)
from tests.sources import flr_images as img

pytestmark = pytest.mark.infra("image tools")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img.need_tools()
    base = tmp_path_factory.mktemp("flr")
    tree = img.make_tree(base / "tree")
    img.gpt_ext4_fat(tree, base / "gpt.img")
    img.mbr_logical(tree, base / "mbr.img")
    return base


def _fs(image: Path, name: str) -> FlrFilesystem:
    fh = image.open("rb")
    volumes = {v.name: v for v in list_volumes(fh, image.stat().st_size, where=image.name)}
    volume = volumes[name]
    return open_filesystem(volume.open(), volume.filesystem, where=f"{image.name} {name}")


def _walk(fs: FlrFilesystem) -> tuple[dict[str, FlrEntry], list[tuple[str, Exception]]]:
    errors: list[tuple[str, Exception]] = []
    found = {
        e.path: e.entry
        for e in flr_walk(fs, fs.root(), lambda p, x: errors.append((p, x)))
        if not e.leave
    }
    return found, errors


def test_partitions_of_gpt_and_mbr_with_logical(images: Path) -> None:
    gpt = list_volumes(
        (images / "gpt.img").open("rb"), (images / "gpt.img").stat().st_size, where="gpt"
    )
    assert [(v.name, v.offset, v.size_bytes, v.filesystem) for v in gpt] == [
        ("p1", 1 << 20, 40 << 20, "ext4"),
        ("p2", 41 << 20, 40 << 20, "fat32"),
    ]
    mbr = list_volumes(
        (images / "mbr.img").open("rb"), (images / "mbr.img").stat().st_size, where="mbr"
    )
    assert [(v.name, v.type, v.filesystem) for v in mbr] == [
        ("p1", "0x06", "fat16"),
        ("p5", "0x01", "fat12"),
        ("p6", "0x83", "ext4"),
    ]


@pytest.mark.parametrize(("image", "part"), [("gpt.img", "p1"), ("mbr.img", "p6")])
def test_ext4_entries_match_the_source_tree(images: Path, image: str, part: str) -> None:
    found, errors = _walk(_fs(images / image, part))
    assert errors == []
    tree = images / "tree"
    source = {str(p.relative_to(tree)) for p in tree.rglob("*")}
    assert set(found) - {"lost+found"} == source
    for rel in source:
        st, entry = (tree / rel).lstat(), found[rel]
        assert stat.S_IMODE(st.st_mode) == entry.mode, rel
        assert (st.st_uid, st.st_gid) == (entry.uid, entry.gid), rel
        assert st.st_mtime_ns == entry.mtime_ns, rel
        if stat.S_ISLNK(st.st_mode):
            assert entry.type == "symlink" and entry.link_target == os.readlink(tree / rel)
        elif stat.S_ISREG(st.st_mode):
            assert entry.type == "file" and entry.size == st.st_size
    assert found["hosts-hardlink"].inode == found["etc/hosts"].inode
    assert found["etc/hosts"].nlink == 2
    fs = _fs(images / image, part)
    parts, entry = flr_lookup(fs, "/etc/deep/deeper/data.bin", where=image)
    assert parts == ["etc", "deep", "deeper", "data.bin"]
    data = b"".join(flr_read(fs, entry, path="data.bin", block_bytes=65536))
    assert data == (tree / "etc/deep/deeper/data.bin").read_bytes()


@pytest.mark.parametrize(
    ("image", "part"), [("gpt.img", "p2"), ("mbr.img", "p1"), ("mbr.img", "p5")]
)
def test_fat_entries_and_content(images: Path, image: str, part: str) -> None:
    fs = _fs(images / image, part)
    found, errors = _walk(fs)
    assert errors == []
    tree = images / "tree"
    regular = {str(p.relative_to(tree)) for p in tree.rglob("*") if not p.is_symlink()}
    assert set(found) == regular
    for rel in regular:
        assert (
            found[rel].mtime_ns // 2_000_000_000 == (tree / rel).stat().st_mtime_ns // 2_000_000_000
        )
    _, entry = flr_lookup(fs, "/ETC/Hosts", where=image)  # FAT is case-insensitive
    assert b"".join(flr_read(fs, entry, path="hosts")) == (tree / "etc/hosts").read_bytes()


def test_ntfs_and_xfs(tmp_path: Path) -> None:
    img.need_tools()
    files = {"a.txt": b"hello ntfs\n", "big.bin": os.urandom(3_000_000)}
    img.ntfs_image(files, tmp_path / "ntfs.img", 16)
    fs = _fs(tmp_path / "ntfs.img", "p0")
    assert fs.kind == "ntfs"
    found, errors = _walk(fs)
    assert errors == []
    assert {"a.txt", "big.bin"} <= set(found)
    for name, data in files.items():
        assert found[name].size == len(data)
        assert b"".join(flr_read(fs, found[name], path=name)) == data

    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(1_000_000))
    img.xfs_image(
        [
            f"data.bin ---640 1001 1002 {payload}",
            "sub d--750 7 8",
            "lnk l--777 0 0 ../data.bin",
            "$",
        ],
        tmp_path / "xfs.img",
    )
    fs = _fs(tmp_path / "xfs.img", "p0")
    found, errors = _walk(fs)
    assert errors == []
    assert (found["data.bin"].mode, found["data.bin"].uid, found["data.bin"].gid) == (
        0o640,
        1001,
        1002,
    )
    assert (found["sub"].type, found["sub"].mode, found["sub"].uid) == ("dir", 0o750, 7)
    assert found["sub/lnk"].link_target == "../data.bin"
    assert b"".join(flr_read(fs, found["data.bin"], path="d")) == payload.read_bytes()


@pytest.mark.infra("lvm2", "loop devices")
def test_lvm_logical_volumes_in_a_gpt_partition(tmp_path: Path) -> None:
    img.need_tools()
    img.lvm_tools()
    tree = img.make_tree(tmp_path / "tree")
    vg = img.lvm_disk(tree, tmp_path / "lvm.img")
    image = tmp_path / "lvm.img"
    volumes = list_volumes(image.open("rb"), image.stat().st_size, where="lvm")
    assert [(v.name, v.type, v.label, v.size_bytes, v.filesystem) for v in volumes] == [
        ("p1", "0fc63daf-8483-4772-8e79-3d69d8477de4", "", 16 << 20, "fat16"),
        ("p2", "e6d6d379-f507-44c2-a23c-238f2a3df928", "", 64 << 20, "lvm2"),
        (f"{vg}-root", "lvm", vg, 24 << 20, "ext4"),
        (f"{vg}-data--x", "lvm", vg, 16 << 20, "fat16"),
    ]
    found, errors = _walk(_fs(image, f"{vg}-root"))
    assert errors == [] and found["etc/secret"].uid == 1234
    fs = _fs(image, f"{vg}-data--x")
    _, entry = flr_lookup(fs, "/etc/deep/deeper/data.bin", where="lvm")
    data = b"".join(flr_read(fs, entry, path="data.bin"))
    assert data == (tree / "etc/deep/deeper/data.bin").read_bytes()


@pytest.mark.infra("btrfs")
def test_btrfs_entries_match_the_source_tree(tmp_path: Path) -> None:
    img.need_tools()
    img.btrfs_tools()
    tree = img.make_tree(tmp_path / "tree")
    img.btrfs_image(tree, tmp_path / "b.img")
    fs = _fs(tmp_path / "b.img", "p0")
    assert fs.kind == "btrfs"
    found, errors = _walk(fs)
    assert errors == []
    assert set(found) == {str(p.relative_to(tree)) for p in tree.rglob("*")}
    for rel, entry in found.items():
        st = (tree / rel).lstat()
        assert (entry.mode, entry.uid, entry.gid) == (
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
        )
        assert entry.mtime_ns == st.st_mtime_ns, rel
    assert found["hosts-hardlink"].inode == found["etc/hosts"].inode
    assert found["abs-link"].link_target == "/etc/passwd"
    data = b"".join(flr_read(fs, found["etc/deep/deeper/data.bin"], path="data.bin"))
    assert data == (tree / "etc/deep/deeper/data.bin").read_bytes()


@pytest.fixture
def evil(tmp_path: Path) -> Path:
    """ext4 with entries named '..' and 'a/b', a folder that contains itself, a symlink loop."""
    img.need_tools()
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "Q9").write_text("dotdot\n")
    (tree / "aXb").write_text("slash\n")
    (tree / "d" / "f").write_text("fine\n")
    os.symlink("loop", tree / "loop")
    os.symlink("/d", tree / "abs")
    os.symlink("x" * 100, tree / "long")
    image = tmp_path / "evil.img"
    img.run("mke2fs", "-q", "-F", "-t", "ext4", "-O", "^metadata_csum", "-d", tree, image, "8M")
    img.run("debugfs", "-w", "-R", "link /d /d/back", image)  # a folder inside itself
    img.run("debugfs", "-w", "-R", "sif /long size 100000", image)  # a symlink of 100 kB
    data = bytearray(image.read_bytes())
    for old, new in ((b"\x02\x01Q9", b"\x02\x01.."), (b"\x03\x01aXb", b"\x03\x01a/b")):
        assert data.count(old) == 1
        at = data.index(old)
        data[at : at + len(old)] = new
    image.write_bytes(data)
    return image


def test_crafted_names_and_loops_are_reported_not_followed(evil: Path) -> None:
    fs = _fs(evil, "p0")
    found, errors = _walk(fs)
    assert "d/f" in found and "d/back" in found
    assert not any(".." in p.split("/") or "a/b" in p for p in found)
    messages = {path: err for path, err in errors}
    assert isinstance(messages["/'..'"], UnsafePathError)
    assert isinstance(messages["/'a/b'"], UnsafePathError)
    assert "contains itself" in str(messages["/d/back"])
    assert "/long - corrupt: ValueError: symlink target of 100000 bytes" in str(messages["/long"])
    assert "abs" in found and "loop" in found  # the walk went on after the broken entry
    with pytest.raises(SourceError, match="too many symlinks"):
        flr_lookup(fs, "/loop/x", where="evil")
    # An absolute symlink in the middle of a path is resolved inside the filesystem.
    parts, entry = flr_lookup(fs, "/abs/f", where="evil")
    assert parts == ["d", "f"] and entry.size == 5
    with pytest.raises(SourceError, match="no such file"):
        flr_lookup(fs, "/d/nothing", where="evil")


def test_corrupt_superblock_and_partition_table(tmp_path: Path) -> None:
    img.need_tools()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    image = tmp_path / "bad.img"
    img.run("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image, "8M")
    with image.open("r+b") as f:  # magic kept, inode and block counts destroyed
        f.seek(1024)
        f.write(b"\0" * 12)
    with pytest.raises(SourceError, match=r"ext4 filesystem on bad.img p0 - corrupt"):
        _fs(image, "p0")
    with image.open("r+b") as f:
        f.seek(1080)
        f.write(b"\0\0")  # no magic: nothing recognisable
    with pytest.raises(SourceError, match=r"bad\.img p0 - it holds no filesystem"):
        _fs(image, "p0")
    disk = tmp_path / "table.img"
    img.partition(disk, 8, "label: dos\nstart=1MiB,size=6MiB,type=83\n")
    with disk.open("r+b") as f:  # partition 1 now starts past the end of the disk
        f.seek(446 + 8)
        f.write((10**6).to_bytes(4, "little"))
    with pytest.raises(SourceError, match=r"table\.img - partition 1 .* outside the disk"):
        list_volumes(disk.open("rb"), disk.stat().st_size, where="table.img")


def test_truncated_file_content_is_an_error_naming_it(tmp_path: Path) -> None:
    img.need_tools()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(2 << 20))
    image = tmp_path / "t.img"
    img.run("mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, image, "8M")
    fs = _fs(image, "p0")
    _, entry = flr_lookup(fs, "/big", where="t")
    entry.size += 5 << 20  # the inode claims more than its extents hold
    with pytest.raises(SourceError, match="reading /big"):
        b"".join(flr_read(fs, entry, path="/big"))
