"""Restoring real trees: every type, metadata, holes, hard links, threads."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stratavault.errors import RestoreError
from stratavault.sources import FsRestorer, RawDiskTarget, _raw_disk, walk
from stratavault.sources._restore import _nonzero_pieces
from tests.sources.conftest import Errors, comparable, needs_root, restore_walked, walk_all

MiB = 1 << 20


@dataclass
class Meta:
    """Restore metadata as the snapshot's nodes carry it."""

    type: str = "file"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    size: int = 0
    mtime_ns: int = 1_600_000_000_000_000_000
    atime_ns: int = 1_600_000_000_000_000_001
    rdev: int = 0
    nlink: int = 1
    link_target: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def build_source(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"content\n")
    os.chmod(root / "dir" / "file", 0o4750)
    os.setxattr(root / "dir" / "file", "user.k", b"v\x00")
    subprocess.run(["setfacl", "-m", "u:nobody:rw", str(root / "dir" / "file")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:nogroup:rx", str(root / "dir" / "sub")], check=True)
    os.link(root / "dir" / "file", root / "dir" / "sub" / "hardlink")
    (root / "dir" / "rel-link").symlink_to("file")
    (root / "abs-link").symlink_to("/nonexistent/target")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.mknod(root / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.chown(root / "null", 65534, 65534)
    os.lchown(root / "abs-link", 4242, 4343)  # ids without names
    with open(root / "sparse", "wb") as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    (root / os.fsdecode(b"non-utf8-\xff\xfe")).write_bytes(b"bytes name")
    os.chmod(root / "dir", 0o750)
    for path in [root / "dir" / "sub", root / "dir", root]:
        os.utime(path, ns=(1_500_000_000_000_000_000, 1_500_000_000_123_456_789))


@needs_root
@pytest.mark.infra("root")
def test_round_trip_of_every_type(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_source(src)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "sock"))
        entries = walk_all(src)
    target = tmp_path / "target"
    with FsRestorer(target) as restorer:
        restore_walked(entries, tmp_path, restorer)
    assert restorer.issues == []
    assert [s.path for s in restorer.skipped] == ["src/sock"]
    restored = walk_all(target / "src")
    expected = [comparable(e) for e in entries if e.type != "socket"]
    assert [comparable(e) for e in restored] == expected
    st_src, st_dst = os.stat(src / "sparse"), os.stat(target / "src" / "sparse")
    assert st_dst.st_blocks <= st_src.st_blocks  # holes stayed holes
    assert (target / "src" / "sparse").read_bytes() == (src / "sparse").read_bytes()
    assert os.stat(target / "src" / "null").st_rdev == os.makedev(1, 3)
    assert os.path.samefile(target / "src/dir/file", target / "src/dir/sub/hardlink")


def test_zero_blocks_in_written_data_become_holes(tmp_path: Path) -> None:
    data = os.urandom(4096) + bytes(2 * MiB) + os.urandom(100)
    with FsRestorer(tmp_path / "t") as restorer:
        handle = restorer.create_file(["f"], Meta(size=8 * MiB))
        assert handle is not None
        handle.write_at(4096 * 3 + 10, data)  # unaligned start
        handle.write_at(8 * MiB - 4096, bytes(4096))
        restorer.finish_file(handle)
    path = tmp_path / "t" / "f"
    expected = bytearray(8 * MiB)
    expected[4096 * 3 + 10 : 4096 * 3 + 10 + len(data)] = data
    assert path.read_bytes() == expected
    st = os.stat(path)
    assert st.st_size == 8 * MiB
    assert st.st_blocks * 512 <= 4 * 4096  # only the blocks holding the random bytes
    assert restorer.issues == []


def test_nonzero_pieces_leave_out_exactly_the_aligned_zero_blocks() -> None:
    rng = random.Random(5)
    for _ in range(400):
        data = bytearray(rng.randrange(1, 70_000))
        for _ in range(rng.randrange(0, 6)):
            at = rng.randrange(len(data))
            n = min(rng.randrange(1, 12_000), len(data) - at)
            data[at : at + n] = rng.randbytes(n)
        offset = rng.choice([0, 4096, rng.randrange(50_000)])
        zero_blocks = {
            at
            for at in range(-offset % 4096, len(data) - 4095, 4096)
            if not any(data[at : at + 4096])
        }
        frame = rng.randbytes(300) + bytes(data) + rng.randbytes(300)  # a member of a frame
        for view in (memoryview(bytes(data)), memoryview(data), memoryview(frame)[300:-300]):
            rebuilt = bytearray(len(data))
            for at, piece in _nonzero_pieces(view, offset):
                start = at - offset
                rebuilt[start : start + len(piece)] = piece
                assert not any(start <= z and z + 4096 <= start + len(piece) for z in zero_blocks)
            assert rebuilt == data


def test_a_restored_disk_is_written_back_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel is asked to start writeback every 32 MiB, so the final fsync is short."""
    kicks: list[int] = []
    monkeypatch.setattr(_raw_disk, "_start_writeback", kicks.append)
    block = os.urandom(MiB)
    with RawDiskTarget(tmp_path / "disk.raw", 80 * MiB, create=True) as target:
        for n in range(70):
            target.write(n * MiB, block)
        assert len(kicks) == 2  # after 32 and 64 MiB
        target.sync()
    _raw_disk._start_writeback(os.open(tmp_path / "disk.raw", os.O_RDONLY))  # the real call


@pytest.mark.parametrize("fresh", [True, False])
def test_disk_target_writes_neighbours_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: bool
) -> None:
    """Chunks that follow each other on the disk go out in one pwritev; zero blocks of a
    new file stay holes; a short write is finished."""
    calls: list[int] = []
    real = os.pwritev

    def short_pwritev(fd: int, views: list[memoryview], offset: int) -> int:
        calls.append(len(views))
        return real(fd, views, offset) if len(calls) > 1 else real(fd, [views[0][:100]], offset)

    monkeypatch.setattr(_raw_disk.os, "pwritev", short_pwritev)
    path = tmp_path / "disk.raw"
    if not fresh:
        path.write_bytes(b"\xff" * 4 * MiB)
    chunk = 64 << 10
    data = [os.urandom(chunk), bytes(chunk), os.urandom(chunk), os.urandom(chunk)]
    with RawDiskTarget(path, 4 * MiB, create=fresh) as target:
        target.write_ranges([(0, data[0]), (chunk, data[1]), (2 * chunk, data[2])])
        target.write_ranges([(MiB, data[3])])
    got = path.read_bytes()
    assert got[: 3 * chunk] == b"".join(data[:3]) and got[MiB : MiB + chunk] == data[3]
    # fresh: the zero chunk between is a hole, so two runs; else one run of three
    assert calls == ([1, 1, 1] if fresh else [3, 1])
    if fresh:
        with path.open("rb") as f:
            assert os.lseek(f.fileno(), chunk, os.SEEK_HOLE) == chunk


def test_content_in_any_order_from_threads_with_few_descriptors(tmp_path: Path) -> None:
    rng = random.Random(7)
    contents = {f"f{i}": rng.randbytes(rng.randrange(1, 300_000)) for i in range(40)}
    with FsRestorer(tmp_path / "t", max_open_files=3) as restorer:
        handles = {n: restorer.create_file([n], Meta(size=len(c))) for n, c in contents.items()}
        pieces = [
            (name, off, content[off : off + 4096 * 5])
            for name, content in contents.items()
            for off in range(0, len(content), 4096 * 5)
        ]
        rng.shuffle(pieces)

        def writer(part: list[tuple[str, int, bytes]]) -> None:
            for name, off, data in part:
                handle = handles[name]
                assert handle is not None
                handle.write_at(off, data)

        threads = [threading.Thread(target=writer, args=(pieces[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for handle in handles.values():
            assert handle is not None
            restorer.finish_file(handle)
            assert len(restorer._open_files) <= 3
    assert restorer.issues == []
    for name, content in contents.items():
        assert (tmp_path / "t" / name).read_bytes() == content


def test_directory_metadata_is_set_after_children(tmp_path: Path) -> None:
    meta = Meta(type="dir", mode=0o555, mtime_ns=1_234_567_890_123_456_789)
    with FsRestorer(tmp_path / "t") as restorer:
        assert restorer.make_dir(["d"], meta)
        assert restorer.make_dir(["d", "e"], meta)
        handle = restorer.create_file(["d", "e", "f"], Meta(size=3))
        assert handle is not None
        handle.write_at(0, b"abc")
        restorer.finish_file(handle)
        restorer.finish_dir(["d", "e"])
        restorer.make_entry(["d", "late"], Meta(type="fifo"))
    for path in [tmp_path / "t" / "d", tmp_path / "t" / "d" / "e"]:
        st = os.stat(path)
        assert (st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (1_234_567_890_123_456_789, 0o555)


@needs_root
def test_owner_by_name_else_numeric(tmp_path: Path) -> None:
    nobody = 65534
    metas = {
        "by-name": Meta(uid=4242, gid=4343, user="nobody", group="nogroup"),
        "unknown-name": Meta(uid=4242, gid=4343, user="no-such-user-x", group="no-such-group-x"),
        "no-name": Meta(uid=4242, gid=4343),
    }
    for numeric in (False, True):
        target = tmp_path / str(numeric)
        with FsRestorer(target, numeric_owner=numeric) as restorer:
            for name, meta in metas.items():
                handle = restorer.create_file([name], meta)
                assert handle is not None
                restorer.finish_file(handle)
        owners = {n: (os.stat(target / n).st_uid, os.stat(target / n).st_gid) for n in metas}
        expected_by_name = (4242, 4343) if numeric else (nobody, nobody)
        assert owners == {
            "by-name": expected_by_name, "unknown-name": (4242, 4343), "no-name": (4242, 4343),
        }  # fmt: skip


def test_inherited_default_acl_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx", str(target)], check=True)
    with FsRestorer(target) as restorer:
        handle = restorer.create_file(["plain"], Meta(mode=0o640))
        assert handle is not None
        restorer.finish_file(handle)
    assert "system.posix_acl_access" not in os.listxattr(target / "plain")
    assert stat.S_IMODE(os.stat(target / "plain").st_mode) == 0o640


def test_verify_and_read_back(tmp_path: Path) -> None:
    def sha(pieces: Iterable[bytes]) -> bytes:
        h = hashlib.sha256()
        for p in pieces:
            h.update(p)
        return h.digest()

    with FsRestorer(tmp_path / "t") as restorer:
        handle = restorer.create_file(["f"], Meta(size=5))
        assert handle is not None
        handle.write_at(0, b"hello")
        restorer.finish_file(handle)
        assert b"".join(restorer.read_back(["f"])) == b"hello"
        assert restorer.verify_file(["f"], sha, hashlib.sha256(b"hello").digest())
        assert not restorer.verify_file(["f"], sha, hashlib.sha256(b"other").digest())
    assert [i.path for i in restorer.issues] == ["f"]
    assert "differs" in str(restorer.issues[0])


def test_failures_are_collected_and_restore_goes_on(tmp_path: Path) -> None:
    with FsRestorer(tmp_path / "t") as restorer:
        assert restorer.create_file(["missing-dir", "f"], Meta()) is None
        assert not restorer.make_entry(["l"], Meta(type="symlink"))  # no target
        handle = restorer.create_file(["ok"], Meta(size=1))
        assert handle is not None
        handle.write_at(0, b"x")
        restorer.finish_file(handle)
        with pytest.raises(RestoreError, match="already finished"):
            handle.write_at(0, b"y")
        unfinished = restorer.create_file(["never"], Meta())
        assert unfinished is not None
    assert [i.path for i in restorer.issues] == ["missing-dir/f", "l", "never"]
    assert "missing-dir" in str(restorer.issues[0]) and "No such file" in str(restorer.issues[0])
    assert (tmp_path / "t" / "ok").read_bytes() == b"x"


def test_existing_entries_are_replaced_not_written_through(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    os.link(outside, target / "hard")  # a pre-existing hard link to a file outside
    (target / "dir").mkdir()
    with FsRestorer(target) as restorer:
        handle = restorer.create_file(["hard"], Meta(size=3))
        assert handle is not None
        handle.write_at(0, b"new")
        restorer.finish_file(handle)
        assert restorer.create_file(["dir"], Meta()) is None  # a directory is in the way
    assert outside.read_bytes() == b"keep me"
    assert (target / "hard").read_bytes() == b"new"
    assert "directory of that name is in the way" in str(restorer.issues[0])


def test_walk_restore_walk_of_non_utf8_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    raw = b"\xe9t\xe9"
    os.mkdir(os.fsencode(src) + b"/" + raw)
    with open(os.fsencode(src) + b"/" + raw + b"/\xff", "wb") as f:
        f.write(b"data")
    entries = list(walk([src], on_error=Errors()))
    with FsRestorer(tmp_path / "t") as restorer:
        restore_walked(entries, tmp_path, restorer)
    assert restorer.issues == []
    with open(os.fsencode(tmp_path) + b"/t/src/" + raw + b"/\xff", "rb") as f:
        assert f.read() == b"data"
