"""Reading file content: holes skipped, changes and swaps detected."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from stratavault.sources import FileChangedError, SparseFileReader, read_file_extents

MiB = 1 << 20


def make_sparse(path: Path) -> bytes:
    """A 20 MiB file: data at 0, hole, data at 9 MiB (crossing buffers), hole to the end."""
    with open(path, "wb") as f:
        f.truncate(20 * MiB)
        f.write(b"A" * 4096)
        f.seek(9 * MiB)
        f.write(os.urandom(3 * MiB))
    return path.read_bytes()


def test_holes_are_skipped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    content = make_sparse(path)
    with SparseFileReader(path, buffer_bytes=2 * MiB) as reader:
        pieces = list(reader.extents())
        assert not reader.changed()
        reader.check_unchanged()
        assert reader.data_ranges == [(0, 4096), (9 * MiB, 3 * MiB)]
        assert reader.holes() == [(4096, 9 * MiB - 4096), (12 * MiB, 8 * MiB)]
        assert reader.size == 20 * MiB
    assert all(len(d) <= 2 * MiB for _, d in pieces)
    rebuilt = bytearray(20 * MiB)
    for offset, data in pieces:
        rebuilt[offset : offset + len(data)] = data
    assert rebuilt == content


def test_reused_buffer_and_fresh_bytes_give_the_same(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(5 * MiB + 3))
    with SparseFileReader(path, buffer_bytes=MiB, reuse_buffer=True) as reader:
        joined = b"".join(bytes(d) for _, d in reader.extents())
    assert joined == path.read_bytes()
    assert b"".join(d for _, d in read_file_extents(path, buffer_bytes=MiB)) == joined


def test_empty_and_all_hole_files(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with open(tmp_path / "hole", "wb") as f:
        f.truncate(5 * MiB)
    assert list(read_file_extents(tmp_path / "empty")) == []
    with SparseFileReader(tmp_path / "hole") as reader:
        assert list(reader.extents()) == []
        assert reader.holes() == [(0, 5 * MiB)]


def test_append_by_another_thread_while_reading_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "growing"
    path.write_bytes(os.urandom(4 * MiB))
    first_read, appended = threading.Event(), threading.Event()

    def appender() -> None:
        first_read.wait(10)
        with open(path, "ab") as f:
            f.write(b"more")
        appended.set()

    thread = threading.Thread(target=appender)
    thread.start()
    with SparseFileReader(path, buffer_bytes=MiB) as reader:
        total = 0
        for _, data in reader.extents():
            total += len(data)
            first_read.set()
            appended.wait(10)
        thread.join()
        assert total == 4 * MiB  # reads up to the size seen at open
        assert reader.changed()
        with pytest.raises(FileChangedError, match="changed while being read") as info:
            reader.check_unchanged()
    assert info.value.before.size == 4 * MiB
    assert info.value.after.size == 4 * MiB + 4


def test_truncation_while_reading_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "shrinking"
    path.write_bytes(os.urandom(4 * MiB))
    gen = read_file_extents(path, buffer_bytes=MiB)
    next(gen)
    os.truncate(path, MiB // 2)
    with pytest.raises(FileChangedError):
        list(gen)


def test_unchanged_rewrite_with_same_size_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    with SparseFileReader(path) as reader:
        list(reader.extents())
        with open(path, "r+b") as f:
            f.write(b"b")
        assert reader.changed()


def test_vanished_file_fails_with_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SparseFileReader(tmp_path / "gone")


def test_fifo_swapped_in_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "was-a-file"
    os.mkfifo(path)  # no writer: a blocking open would hang forever
    with pytest.raises(OSError, match="not a regular file"):
        SparseFileReader(path)


def test_symlink_swapped_in_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError) as info:
        SparseFileReader(tmp_path / "link")
    assert info.value.errno == errno.ELOOP


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        SparseFileReader(tmp_path)


def test_stamp_at_open_tells_a_swap_since_the_walk(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    ino = os.stat(path).st_ino
    os.rename(path, tmp_path / "old")
    path.write_bytes(b"y")
    with SparseFileReader(path) as reader:
        assert reader.stamp_at_open.inode != ino


def test_prefetch_files_ignores_missing_and_special_files(tmp_path: Path) -> None:
    from stratavault.sources import prefetch_files

    data = tmp_path / "data"
    data.write_bytes(b"x" * 100_000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    prefetch_files([data, tmp_path / "missing", str(fifo)])  # must neither raise nor block
    assert data.read_bytes() == b"x" * 100_000


def test_prefetch_metadata_counts_files_and_survives_errors(tmp_path: Path) -> None:
    from stratavault.sources import prefetch_metadata

    for i in range(5):
        (tmp_path / "a" / f"d{i}").mkdir(parents=True)
        (tmp_path / "a" / f"d{i}" / "f").write_text("x" * (i + 1))
    os.symlink("/nonexistent", tmp_path / "a" / "dangling")
    (tmp_path / "single").write_bytes(b"12345678")
    roots = [str(tmp_path / "a"), str(tmp_path / "missing"), str(tmp_path / "single")]
    assert prefetch_metadata(roots) == prefetch_metadata(roots, threads=1) == (6, 15 + 8)
    excluded = prefetch_metadata(roots, excludes=[str(tmp_path / "a" / "d[01]")])
    assert excluded == (4, 12 + 8)
    locked = tmp_path / "a" / "d4"
    locked.chmod(0)
    try:
        assert prefetch_metadata(roots)[0] == (5 if os.geteuid() != 0 else 6)
    finally:
        locked.chmod(0o755)
