"""Sample trees for the demo: make one, change it, compare a restore with its source.

    python scripts/demo_tree.py make DIR      # files, symlinks, hard link, sparse file, xattrs
    python scripts/demo_tree.py change DIR    # modify, add, delete, chmod, change an xattr
    python scripts/demo_tree.py compare SRC RESTORED

`compare` checks, for every entry: type, content (sha256), size, permission bits, uid, gid,
mtime (files and directories, to the microsecond), symlink targets, user.* xattrs and hard-link
groups. A file that was sparse and came back dense is reported but is not a failure.
Standard library only, deterministic (fixed seed), Linux.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

MIB = 1024 * 1024
MTIME_TOLERANCE_NS = 1_000
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "kilo")


def text_blob(rng: random.Random, size: int) -> bytes:
    """Compressible, dedupable text of about `size` bytes."""
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rng.choices(WORDS, k=12)) + "\n").encode()
    return bytes(out[:size])


def make_tree(root: Path) -> None:
    """Create the demo sample tree under `root` (which must not exist)."""
    rng = random.Random(20240501)
    root.mkdir(parents=True)
    for d in range(12):
        sub = root / f"dir{d:02d}" / ("nested" if d % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(25):
            kind = rng.random()
            if kind < 0.70:
                data = text_blob(rng, rng.randint(0, 8192))
            elif kind < 0.95:
                data = rng.randbytes(rng.randint(8192, 256 * 1024))
            else:
                data = text_blob(rng, rng.randint(MIB, 3 * MIB))
            path = sub / f"file{f:03d}"
            path.write_bytes(data)
            if f % 10 == 0:
                path.chmod(0o600)
            elif f % 10 == 1:
                path.chmod(0o755)
    big = rng.randbytes(4 * MIB)
    (root / "big.bin").write_bytes(big + big[: MIB // 2])  # internal duplicate for dedup
    (root / "empty").touch()
    (root / "empty-dir").mkdir()
    (root / "name with spaces & ünïcödé.txt").write_text("non-ASCII name\n", encoding="utf-8")
    (root / "link-to-file").symlink_to("dir01/file000")
    (root / "dangling-link").symlink_to("does/not/exist")
    os.link(root / "dir02" / "file003", root / "hardlink-to-dir02-file003")
    with open(root / "sparse.img", "wb") as fh:
        fh.write(b"start of a sparse file\n")
        fh.seek(8 * MIB)
        fh.write(b"middle\n")
        fh.truncate(16 * MIB)
    os.setxattr(root / "dir04" / "file004", "user.demo.color", b"blue")
    os.setxattr(root / "dir04", "user.demo.note", b"a directory with an xattr")
    os.setxattr(root / "big.bin", "user.demo.binary", bytes(range(32)))


def change_tree(root: Path) -> None:
    """Change the sample tree the way a day of work would."""
    rng = random.Random(7)
    with open(root / "dir01" / "file002", "ab") as fh:
        fh.write(b"appended after the first backup\n")
    with open(root / "big.bin", "r+b") as fh:
        fh.seek(2 * MIB)
        fh.write(rng.randbytes(64 * 1024))
    (root / "dir05" / "file006").unlink()
    (root / "dir06" / "new-file.txt").write_bytes(text_blob(rng, 5000))
    (root / "new-dir").mkdir()
    (root / "new-dir" / "data.bin").write_bytes(rng.randbytes(100_000))
    (root / "dir07" / "file008").chmod(0o640)
    os.setxattr(root / "dir04" / "file004", "user.demo.color", b"green")


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below root (root itself as '.'), sorted, not following symlinks."""
    yield ".", root.lstat()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            yield str(path.relative_to(root)), path.lstat()


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def user_xattrs(path: Path) -> dict[str, bytes]:
    """The user.* extended attributes of an entry (not following symlinks)."""
    names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def compare_entry(rel: str, a: Path, sa: os.stat_result, b: Path, sb: os.stat_result) -> list[str]:
    """Differences between one source entry and its restored counterpart."""
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return [f"{rel}: type {stat.filemode(sa.st_mode)} became {stat.filemode(sb.st_mode)}"]
    problems = []
    if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
        problems.append(f"{rel}: owner {sa.st_uid}:{sa.st_gid} became {sb.st_uid}:{sb.st_gid}")
    if stat.S_ISLNK(sa.st_mode):
        if os.readlink(a) != os.readlink(b):
            problems.append(f"{rel}: symlink target {os.readlink(a)!r} became {os.readlink(b)!r}")
        return problems
    if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
        problems.append(f"{rel}: mode {oct(sa.st_mode)} became {oct(sb.st_mode)}")
    if abs(sa.st_mtime_ns - sb.st_mtime_ns) > MTIME_TOLERANCE_NS:
        problems.append(f"{rel}: mtime {sa.st_mtime_ns} became {sb.st_mtime_ns}")
    if user_xattrs(a) != user_xattrs(b):
        problems.append(f"{rel}: xattrs {user_xattrs(a)} became {user_xattrs(b)}")
    if stat.S_ISREG(sa.st_mode):
        if sa.st_size != sb.st_size:
            problems.append(f"{rel}: size {sa.st_size} became {sb.st_size}")
        elif sha256(a) != sha256(b):
            problems.append(f"{rel}: content differs")
    return problems


def compare_trees(src: Path, restored: Path) -> tuple[list[str], list[str]]:
    """(problems, notes) after comparing every entry of two trees."""
    a_entries = dict(walk(src))
    b_entries = dict(walk(restored))
    problems = [f"{rel}: missing from the restore" for rel in a_entries if rel not in b_entries]
    problems += [f"{rel}: not in the source" for rel in b_entries if rel not in a_entries]
    notes = []
    groups: dict[tuple[int, int], list[str]] = {}
    for rel, sa in a_entries.items():
        sb = b_entries.get(rel)
        if sb is None:
            continue
        problems += compare_entry(rel, src / rel, sa, restored / rel, sb)
        if stat.S_ISREG(sa.st_mode) and sa.st_nlink > 1:
            groups.setdefault((sa.st_dev, sa.st_ino), []).append(rel)
        sparse = sa.st_blocks * 512 < sa.st_size // 2
        if stat.S_ISREG(sa.st_mode) and sparse and sb.st_blocks * 512 >= sa.st_size // 2:
            notes.append(f"{rel}: sparse in the source, restored dense")
    for members in groups.values():
        inodes = {b_entries[m].st_ino for m in members if m in b_entries}
        if len(inodes) != 1:
            problems.append(f"hard links {members} were not restored as one file")
    return problems, notes


def main(argv: list[str]) -> int:
    """Command-line entry point; returns the exit status."""
    if len(argv) == 2 and argv[0] == "make":
        make_tree(Path(argv[1]))
    elif len(argv) == 2 and argv[0] == "change":
        change_tree(Path(argv[1]))
    elif len(argv) == 3 and argv[0] == "compare":
        problems, notes = compare_trees(Path(argv[1]), Path(argv[2]))
        for line in notes:
            print(f"  note: {line}")
        for line in problems:
            print(f"  DIFFERENT: {line}")
        if problems:
            return 1
        print(f"  metadata: {sum(1 for _ in walk(Path(argv[1])))} entries identical")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
