"""The walker on real trees: order, metadata, xattrs, excludes, mounts, errors."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stratavault.errors import UsageError
from stratavault.sources import EntryType, FileStamp, FsEntry, same_file_stat, walk, walk_in_process
from tests.sources.conftest import Errors, needs_root, walk_all

Walker = Callable[..., Iterator[FsEntry]]


@pytest.fixture(params=[walk, walk_in_process], ids=["in-process", "child-process"])
def walker(request: pytest.FixtureRequest) -> Walker:
    """Both walkers must give the same entries, errors and order."""
    return request.param  # type: ignore[no-any-return]


def make_tree(root: Path) -> None:
    (root / "b").mkdir(parents=True)
    (root / "b" / "z").write_bytes(b"z")
    (root / "b" / "a").write_bytes(b"a")
    (root / "a").write_bytes(b"hello")
    (root / "c").symlink_to("a")


def test_order_is_depth_first_sorted_with_parents(tmp_path: Path, walker: Walker) -> None:
    root = tmp_path / "t"
    make_tree(root)
    entries = walk_all(root, walker=walker)
    assert [str(Path(e.path).relative_to(tmp_path)) for e in entries] == [
        "t", "t/a", "t/b", "t/b/a", "t/b/z", "t/c",
    ]  # fmt: skip
    assert [e.depth for e in entries] == [0, 1, 1, 2, 2, 1]
    assert all(Path(e.parent) == Path(e.path).parent for e in entries)
    assert entries[0].name == "t"
    assert [e.type for e in entries] == ["dir", "file", "dir", "file", "file", "symlink"]


def test_metadata_comes_from_lstat(tmp_path: Path, walker: Walker) -> None:
    root = tmp_path / "t"
    make_tree(root)
    os.chmod(root / "a", 0o4751)
    os.utime(root / "a", ns=(1_000_000_123, 2_000_000_456))
    entry = {Path(e.path).relative_to(root).as_posix(): e for e in walk_all(root, walker=walker)}
    a, link = entry["a"], entry["c"]
    st = os.lstat(root / "a")
    assert (a.mode, a.size, a.uid, a.gid) == (0o4751, 5, st.st_uid, st.st_gid)
    assert (a.atime_ns, a.mtime_ns, a.ctime_ns) == (1_000_000_123, 2_000_000_456, st.st_ctime_ns)
    assert (a.inode, a.dev, a.nlink) == (st.st_ino, st.st_dev, 1)
    assert a.user == "root" and a.group == "root"
    assert link.link_target == "a" and link.type is EntryType.SYMLINK
    assert link.size == 1  # the link itself, not its target


@needs_root
def test_every_file_type(tmp_path: Path, walker: Walker) -> None:
    root = tmp_path / "t"
    root.mkdir()
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(root / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        entries = {e.name: e for e in walk_all(root, walker=walker)}
    assert entries["fifo"].type is EntryType.FIFO
    assert entries["null"].type is EntryType.CHARDEV
    assert entries["null"].rdev == os.makedev(1, 3)
    assert entries["loop"].type is EntryType.BLOCKDEV
    assert entries["loop"].rdev == os.makedev(7, 0)
    assert entries["sock"].type is EntryType.SOCKET


def test_xattrs_and_acls_are_read(tmp_path: Path, walker: Walker) -> None:
    root = tmp_path / "t"
    make_tree(root)
    os.setxattr(root / "a", "user.note", b"\x00\xffbinary")
    subprocess.run(["setfacl", "-m", "u:nobody:rw", str(root / "a")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:nogroup:rx", str(root / "b")], check=True)
    entry = {Path(e.path).relative_to(root).as_posix(): e for e in walk_all(root, walker=walker)}
    assert entry["a"].xattrs["user.note"] == b"\x00\xffbinary"
    assert "system.posix_acl_access" in entry["a"].xattrs
    assert "system.posix_acl_default" in entry["b"].xattrs
    assert entry["c"].xattrs == {}  # not the xattrs of the link's target


def test_non_utf8_names_survive(tmp_path: Path, walker: Walker) -> None:
    root = tmp_path / "t"
    root.mkdir()
    raw = b"caf\xe9-\xff"
    with open(os.path.join(os.fsencode(root), raw), "wb") as f:
        f.write(b"x")
    (entry,) = walk_all(root, walker=walker)[1:]
    assert entry.name_bytes == raw
    assert os.fsencode(entry.path) == os.fsencode(root) + b"/" + raw
    assert os.path.exists(entry.path)


def test_sorted_by_name_bytes(tmp_path: Path, walker: Walker) -> None:
    root = tmp_path / "t"
    root.mkdir()
    names = [b"\xff", b"B", b"a", b"\xc3\xa9", b"_"]
    for n in names:
        open(os.path.join(os.fsencode(root), n), "wb").close()
    assert [e.name_bytes for e in walk_all(root, walker=walker)[1:]] == sorted(names)


def test_excludes_prune_subtrees(tmp_path: Path, walker: Walker) -> None:
    root = tmp_path / "t"
    for rel in ["keep.txt", "x.tmp", "cache/big", "deep/er/cache/f", "deep/er/keep", "abs/y"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    exclude_file = tmp_path / "excludes"
    exclude_file.write_text(f"# comment\n\n  {root}/abs  \n")
    seen = [
        str(Path(e.path).relative_to(root))
        for e in walker(
            [root], excludes=["*.tmp", "**/cache"], exclude_files=[exclude_file],
            on_error=Errors(),
        )
    ]  # fmt: skip
    assert seen == [".", "deep", "deep/er", "deep/er/keep", "keep.txt"]


def test_excluded_root_and_missing_exclude_file(
    tmp_path: Path, errors: Errors, walker: Walker
) -> None:
    root = tmp_path / "t"
    make_tree(root)
    assert list(walker([root], excludes=[str(root)], on_error=errors)) == []
    with pytest.raises(UsageError, match="exclude file"):
        list(walker([root], exclude_files=[tmp_path / "nope"], on_error=errors))


def test_missing_root_is_reported(tmp_path: Path, errors: Errors, walker: Walker) -> None:
    root = tmp_path / "t"
    make_tree(root)
    entries = list(walker([tmp_path / "gone", root / "a"], on_error=errors))
    assert [e.name for e in entries] == ["a"]
    assert [(p.name, type(e)) for p, e in errors] == [("gone", FileNotFoundError)]


def test_vanishing_entries_are_reported_and_walk_goes_on(tmp_path: Path, errors: Errors) -> None:
    root = tmp_path / "t"
    make_tree(root)
    (root / "d" / "sub").mkdir(parents=True)
    (root / "e").write_bytes(b"")
    seen = []
    for entry in walk([root], on_error=errors):
        seen.append(entry.name)
        if entry.name == "a" and entry.depth == 1:
            (root / "c").unlink()  # listed with its parent, gone before its lstat
        if entry.name == "d":
            (root / "d" / "sub").rmdir()
            (root / "d").rmdir()  # yielded, gone before it is listed
    assert seen == ["t", "a", "b", "a", "z", "d", "e"]
    assert sorted(p.name for p, _ in errors) == ["c", "d"]
    assert all(isinstance(e, FileNotFoundError) for _, e in errors)


@needs_root
@pytest.mark.infra("root")
def test_one_file_system_lists_mount_points_empty(tmp_path: Path, walker: Walker) -> None:
    root = tmp_path / "t"
    make_tree(root)
    mnt = root / "b" / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "inside").write_bytes(b"x")
        names = [Path(e.path).relative_to(root).as_posix() for e in walk_all(root, walker=walker)]
        assert "b/mnt/inside" in names
        entries = list(walker([root], one_file_system=True, on_error=Errors()))
        names = [Path(e.path).relative_to(root).as_posix() for e in entries]
        assert "b/mnt" in names and "b/mnt/inside" not in names
        assert "b/z" in names
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_same_file_stat(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    before = FileStamp.from_stat(os.stat(path))
    (entry,) = walk_all(path)
    assert entry.stamp == before
    assert same_file_stat(before, FileStamp.from_stat(os.stat(path)))
    time.sleep(0.05)  # a kernel with coarse timestamps (one per 4-10 ms tick) moves on
    path.write_bytes(b"two")  # same size, new mtime/ctime
    os.utime(path, ns=(before.mtime_ns, before.mtime_ns))
    after = FileStamp.from_stat(os.stat(path))
    assert not same_file_stat(before, after)  # ctime still differs
    assert same_file_stat(before, after, ignore_ctime=True)
    moved = FileStamp(before.size, before.mtime_ns, before.ctime_ns, before.inode + 1)
    assert not same_file_stat(before, moved)
    assert same_file_stat(before, moved, ignore_inode=True)


def test_walk_in_process_stops_its_child_and_reports_its_death(tmp_path: Path) -> None:
    import multiprocessing

    from stratavault.errors import SourceError

    def walkers() -> list[multiprocessing.process.BaseProcess]:
        return [p for p in multiprocessing.active_children() if p.name == "stratavault-walk"]

    root = tmp_path / "t"
    for i in range(3000):  # more than the pipe holds: the child waits for the reader
        (root / f"d{i // 100}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i // 100}" / f"f{i}").write_bytes(b"")
    entries = walk_in_process([root], on_error=Errors())
    assert next(entries).path == str(root)
    entries.close()  # the consumer stops early: the child goes
    assert walkers() == []
    entries = walk_in_process([root], on_error=Errors())
    next(entries)
    (child,) = walkers()
    child.kill()
    with pytest.raises(SourceError, match="walking the files ended early"):
        list(entries)
    assert walkers() == []


def _walkers() -> list[object]:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name == "stratavault-walk"]


def _records(it: Iterator[Any]) -> list[tuple[str, object]]:
    from stratavault.sources import FolderDone

    return [
        ("done", (r.path, r.key)) if isinstance(r, FolderDone) else ("entry", r.path) for r in it
    ]


@pytest.mark.parametrize("ahead", [7, 10**6], ids=["ahead-7", "whole-tree-ahead"])
def test_standby_walker_walks_ahead_then_gives_what_a_walk_gives(
    tmp_path: Path, ahead: int
) -> None:
    import time

    from stratavault.sources import StandbyWalker, walk_states_in_process

    root = tmp_path / "t"
    for i in range(50):
        (root / f"d{i // 10}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i // 10}" / f"f{i}").write_bytes(b"x" * i)
    paths = [tmp_path / "gone", root]  # an error met before the consumer is ready
    secret = b"k" * 32
    list(walk_states_in_process(paths, known=set(), secret=secret, on_error=Errors()))
    expected_errors = Errors()
    expected = _records(  # the second walk: folders' access times no longer change
        walk_states_in_process(paths, known=set(), secret=secret, on_error=expected_errors)
    )
    standby = StandbyWalker(paths, ahead=ahead)
    assert standby.walks(paths)
    assert not standby.walks(paths, excludes=["*.tmp"])  # a backup then walks anew
    assert not standby.walks([root])
    time.sleep(0.3)  # it walks (up to `ahead` entries) while the backup starts
    errors = Errors()
    walked = _records(standby.walk_states(known=set(), secret=secret, on_error=errors))
    assert walked == expected
    assert any(kind == "done" for kind, _ in walked)
    assert [(p.name, type(e)) for p, e in errors] == [("gone", FileNotFoundError)]
    assert [(p, type(e)) for p, e in errors] == [(p, type(e)) for p, e in expected_errors]
    with pytest.raises(RuntimeError, match="walks once"):
        standby.walk_states(known=set(), secret=secret, on_error=Errors())
    standby.stop()  # used: nothing left to stop
    assert _walkers() == []


def test_standby_walker_ends_unused_and_reports_a_bad_exclude_file_in_place(
    tmp_path: Path,
) -> None:
    import time

    from stratavault.sources import StandbyWalker

    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    unused = StandbyWalker([root])
    assert len(_walkers()) == 1
    unused.stop()  # a backup that walks in its own process
    assert _walkers() == []
    bad = StandbyWalker([root], exclude_files=[tmp_path / "nope"])
    time.sleep(0.2)  # the walk fails before anyone listens: the failure waits
    with pytest.raises(UsageError, match="exclude file"):
        list(bad.walk_states(known=set(), secret=b"k" * 32, on_error=Errors()))
    assert _walkers() == []
