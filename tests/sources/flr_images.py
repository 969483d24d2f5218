"""Disk images for file-level restore tests, built without mounting anything.

mke2fs -d (ext4), mkfs.vfat + mcopy (FAT), mkntfs + ntfscp (NTFS, root folder only),
mkfs.xfs -p protofile (XFS), sfdisk + dd for GPT and MBR (extended/logical) layouts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

MiB = 1 << 20
MTIME = 1_600_000_000
TOOLS = ("mke2fs", "mkfs.vfat", "mcopy", "mkntfs", "ntfscp", "mkfs.xfs", "sfdisk", "debugfs")


def need_tools() -> None:
    """Skip (a failure under CI: the test is marked infra) when an image tool is missing."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"image tools missing: {', '.join(missing)} (scripts/setup.sh installs them)")


def run(*args: str | Path, stdin: str | None = None) -> None:
    """Run a tool; fail the test with its stderr when it fails."""
    done = subprocess.run(
        [str(a) for a in args], input=stdin, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed: {done.stderr}{done.stdout}")


def make_tree(root: Path, *, owners: bool = True) -> Path:
    """A small tree with modes, owners, times, symlinks, a hard link and odd names."""
    (root / "etc" / "deep" / "deeper").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc" / "deep" / "deeper" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "etc" / "secret").write_text("s3cr3t\n")
    (root / "empty").write_bytes(b"")
    (root / "grüße.txt").write_text("non-ASCII name\n")
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o4755)
    os.chmod(root / "etc" / "secret", 0o600)
    os.symlink("etc/hosts", root / "rel-link")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("../../../../outside", root / "etc" / "up-link")
    os.link(root / "etc" / "hosts", root / "hosts-hardlink")
    if owners:
        os.chown(root / "etc" / "secret", 1234, 5678)
        os.lchown(root / "rel-link", 1234, 5678)
        os.chown(root / "etc" / "deep", 4321, 8765)
    for path in [*sorted(root.rglob("*"), key=lambda p: -len(p.parts)), root]:
        os.utime(path, (MTIME + 7, MTIME + len(path.name)), follow_symlinks=False)
    return root


def ext4_image(tree: Path, image: Path, size_mib: int, *, offset: int = 0) -> None:
    """An ext4 filesystem of ``tree`` written into ``image`` at ``offset``."""
    fs = image.with_suffix(".ext4.part")
    run("mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", tree, fs, f"{size_mib}M")
    place(fs, image, offset)


def fat_image(tree: Path, image: Path, size_mib: int, *, bits: int = 32, offset: int = 0) -> None:
    """A FAT filesystem (12/16/32 bits) holding the files and folders of ``tree``."""
    fs = image.with_suffix(f".fat{bits}.part")
    fs.unlink(missing_ok=True)
    run("mkfs.vfat", "-F", str(bits), "-C", fs, str(size_mib * 1024))
    stage = image.with_suffix(".fat-tree")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(tree, stage, symlinks=True)
    for item in sorted(stage.rglob("*"), reverse=True):
        if item.is_symlink():
            item.unlink()
        else:
            os.utime(item, ns=(0, (tree / item.relative_to(stage)).lstat().st_mtime_ns))
    for item in sorted(stage.iterdir()):
        run("mcopy", "-s", "-m", "-i", fs, item, "::/")
    shutil.rmtree(stage)
    place(fs, image, offset)


def ntfs_image(files: dict[str, bytes], image: Path, size_mib: int, *, offset: int = 0) -> None:
    """An NTFS filesystem with ``files`` in its root folder."""
    fs = image.with_suffix(".ntfs.part")
    with fs.open("wb") as f:
        f.truncate(size_mib * MiB)
    run("mkntfs", "-q", "-F", "-f", fs)
    for name, data in files.items():
        src = image.with_name(f"ntfs-src-{name}")
        src.write_bytes(data)
        run("ntfscp", "-f", fs, src, name)
        src.unlink()
    place(fs, image, offset)


def xfs_image(proto_lines: list[str], image: Path, *, size_mib: int = 300) -> None:
    """An XFS filesystem from a protofile body (the lines after the root folder's)."""
    proto = image.with_suffix(".proto")
    proto.write_text("\n".join(["/", "0 0", "d--755 0 0", *proto_lines, "$"]) + "\n")
    image.unlink(missing_ok=True)
    run(
        "mkfs.xfs",
        "-q",
        "-f",
        "-d",
        f"agcount=2,file,name={image},size={size_mib}m",
        "-p",
        proto,
    )


def place(part: Path, image: Path, offset: int) -> None:
    """Copy the filesystem image ``part`` into ``image`` at ``offset`` (sparse), then drop it."""
    if offset == 0 and not image.exists():
        part.rename(image)
        return
    run("dd", f"if={part}", f"of={image}", "bs=1M", f"seek={offset // MiB}", "conv=notrunc,sparse")
    part.unlink()


def partition(image: Path, size_mib: int, script: str) -> None:
    """A new sparse ``image`` of ``size_mib`` with the sfdisk ``script``'s partition table."""
    with image.open("wb") as f:
        f.truncate(size_mib * MiB)
    run("sfdisk", "-q", image, stdin=script)


def gpt_ext4_fat(tree: Path, image: Path) -> None:
    """GPT: p1 ext4 (1-41 MiB), p2 FAT32 (41-81 MiB)."""
    basic_data = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
    script = f"label: gpt\nstart=1MiB,size=40MiB,type=L\nsize=40MiB,type={basic_data}\n"
    partition(image, 82, script)
    ext4_image(tree, image, 40, offset=1 * MiB)
    fat_image(tree, image, 40, offset=41 * MiB)


def mbr_logical(tree: Path, image: Path) -> None:
    """MBR: p1 FAT16 primary, p2 extended holding p5 (FAT12) and p6 (ext4)."""
    partition(
        image,
        48,
        "label: dos\nstart=1MiB,size=16MiB,type=6\nstart=17MiB,size=30MiB,type=5\n"
        "start=18MiB,size=4MiB,type=1\nstart=23MiB,size=24MiB,type=83\n",
    )
    fat_image(tree, image, 16, bits=16, offset=1 * MiB)
    fat_image(tree, image, 4, bits=12, offset=18 * MiB)
    ext4_image(tree, image, 24, offset=23 * MiB)
