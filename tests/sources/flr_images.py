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
    """Run a tool; fail the test with its stderr when it fails. Tools run with ``TZ=UTC``:
    FAT stores local times, which the reader (knowing no guest's zone) takes as UTC."""
    done = subprocess.run(
        [str(a) for a in args], input=stdin, capture_output=True, text=True, check=False,
        env={**os.environ, "TZ": "UTC"},
    )  # fmt: skip
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


def lvm_tools() -> None:
    """Skip (a failure under CI) without root, a free loop device or the lvm2 tools."""
    if os.geteuid() != 0:
        pytest.skip("building an LVM image needs root (a loop device)")
    if shutil.which("pvcreate") is None or shutil.which("losetup") is None:
        pytest.skip("lvm2 tools missing (scripts/setup.sh installs lvm2)")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices here")


def lvm_disk(tree: Path, image: Path) -> str:
    """GPT: p1 FAT16 (1-17 MiB), p2 an LVM2 physical volume (17-81 MiB) with a volume group
    holding ``root`` (ext4 of ``tree``, 24 MiB) and ``data-x`` (FAT16, 16 MiB); returns the
    volume group's name. Made with the real lvm2 tools on a loop device over the partition,
    activation off (no device-mapper needed)."""
    vg = f"vgflr{os.getpid()}"
    lvm_type = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
    partition(image, 82, f"label: gpt\nstart=1MiB,size=16MiB,type=L\nsize=64MiB,type={lvm_type}\n")
    fat_image(tree, image, 16, bits=16, offset=1 * MiB)
    pv_offset = 17 * MiB
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(pv_offset), "--sizelimit", str(64 * MiB), image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    common = ["--devices", loop, "--driverloaded", "n"]
    common += ["--config", "backup { backup = 0 archive = 0 }"]
    try:
        run("pvcreate", "-q", *common, loop)
        run("vgcreate", "-q", "-s", "4M", *common, vg, loop)
        for name, size in (("root", "24M"), ("data-x", "16M")):
            run(
                "lvcreate",
                "-q",
                *common,
                "--activate",
                "n",
                "--zero",
                "n",
                "-L",
                size,
                "-n",
                name,
                vg,
            )
        pe_start = int(_lvm_report("pvs", common, "pe_start", loop)[0].rstrip("B"))
        ranges = dict(
            line.split() for line in _lvm_report("lvs", common, "lv_name,seg_pe_ranges", vg)
        )
    finally:
        run("losetup", "-d", loop)
    for name, place_fs in (("root", ext4_image), ("data-x", fat_image)):
        first = int(ranges[name].rsplit(":", 1)[1].split("-")[0])
        offset = pv_offset + pe_start + first * 4 * MiB
        if place_fs is ext4_image:
            ext4_image(tree, image, 24, offset=offset)
        else:
            fat_image(tree, image, 16, bits=16, offset=offset)
    return vg


def _lvm_report(tool: str, common: list[str], fields: str, what: str) -> list[str]:
    done = subprocess.run(
        [tool, "--noheadings", "--units", "b", "--nosuffix", "-o", fields, *common, what],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def btrfs_tools() -> None:
    """Skip (a failure under CI) without mkfs.btrfs or the dissect.btrfs library."""
    import importlib.util

    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("mkfs.btrfs missing (scripts/setup.sh installs btrfs-progs)")
    if importlib.util.find_spec("dissect.btrfs") is None:
        pytest.skip("dissect.btrfs is not installed")


def btrfs_image(tree: Path, image: Path, size_mib: int = 128) -> None:
    """A Btrfs filesystem of ``tree`` (mkfs.btrfs --rootdir: no mount)."""
    image.unlink(missing_ok=True)
    with image.open("wb") as f:
        f.truncate(size_mib * MiB)
    run("mkfs.btrfs", "-q", "-f", "--rootdir", tree, image)
