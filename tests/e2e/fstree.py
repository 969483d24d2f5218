"""Build a file tree with every kind of entry, and compare two trees byte and metadata."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
from pathlib import Path

NON_UTF8 = b"caf\xe9-latin1.txt"


def build_sample_tree(root: Path, *, seed: int = 7) -> None:
    """A tree with regular, empty, large, sparse, hard-linked files, symlinks, FIFO, device,
    xattrs, a POSIX ACL, odd owners and modes, and a non-UTF-8 name."""
    rnd = random.Random(seed)
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "docs" / "a.txt").write_text("hello world\n" * 100)
    (root / "docs" / "deep" / "er" / "b.bin").write_bytes(rnd.randbytes(3 << 20))
    (root / "docs" / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(rnd.randbytes(5 << 20) + b"\0" * (1 << 20))
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(8 << 20)
        f.write(rnd.randbytes(100_000))
        f.seek(40 << 20)
        f.write(b"middle data")
    (root / "hard1").write_bytes(b"linked content\n")
    os.link(root / "hard1", root / "docs" / "hard2")
    os.symlink("docs/a.txt", root / "link-rel")
    os.symlink("/nonexistent/target", root / "link-dangling")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null-dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.setxattr(root / "docs" / "a.txt", "user.comment", b"backed up")
    os.setxattr(root / "docs", "user.dir-attr", b"\x00\x01binary")
    subprocess.run(["setfacl", "-m", "u:4242:r--", str(root / "big.bin")], check=True)
    odd = root / "owned"
    odd.write_text("owner test")
    os.chown(odd, 1234, 5678)
    os.chmod(odd, 0o4751)
    os.chmod(root / "docs" / "deep", 0o700)
    (root / os.fsdecode(NON_UTF8)).write_text("latin-1 name")
    for n in range(30):
        (root / "many" / f"f{n:03d}").parent.mkdir(exist_ok=True)
        (root / "many" / f"f{n:03d}").write_bytes(rnd.randbytes(rnd.randrange(0, 20000)))
    os.utime(root / "docs" / "a.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def describe(root: Path, *, dir_mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything restore must bring back, per relative path (hard links as groups)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in sorted(dirnames + filenames):
            full = Path(os.fsdecode(os.path.join(dirpath, name)))
            rel = str(full.relative_to(root))
            st = full.lstat()
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            if stat.S_ISREG(kind):
                content = (_digest(full), st.st_size)
                first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
                content = (*content, first)
            elif stat.S_ISLNK(kind):
                content = os.readlink(full)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                content = st.st_rdev
            mtime = st.st_mtime_ns if (dir_mtimes or not stat.S_ISDIR(kind)) else 0
            if stat.S_ISLNK(kind):
                mtime = st.st_mtime_ns
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                mtime,
                content,
                _xattrs(full) if not stat.S_ISLNK(kind) else {},
            )
    return out


def allocated_bytes(path: Path) -> int:
    """Bytes the file really occupies (holes are free)."""
    return path.stat().st_blocks * 512
