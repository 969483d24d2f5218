"""Cold-start readahead: manifests of the files a command loaded, read ahead next time."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time
from pathlib import Path

import pytest

from stratavault.cli import _readahead
from stratavault.cli._readahead import loaded_files, manifest_path, read_ahead, record


def _resident_pages(path: Path) -> int:
    """How many pages of ``path`` are in the page cache (mincore)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # nothing is written
    try:
        vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        start = ctypes.c_char.from_buffer(mapped)
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), size, vec)
        del start  # the mapping cannot close while ctypes holds it
        if failed:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec)
    finally:
        mapped.close()


def _evicted(path: Path) -> Path:
    """``path`` written and dropped from the page cache."""
    path.write_bytes(os.urandom(2 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


def test_manifest_path_needs_a_cache_folder_and_a_plain_name(tmp_path: Path) -> None:
    assert manifest_path(None, "backup-run_image") is None
    assert manifest_path(tmp_path, "backup-run_image") == (
        tmp_path / "startup" / "backup-run_image.files"
    )
    for odd in ("../x", "a/b", "", "x y"):
        assert manifest_path(tmp_path, odd) is None


def test_loaded_files_lists_bytecode_and_native_libraries() -> None:
    import numpy

    files = list(loaded_files())
    assert len(files) == len(set(files))
    assert all(f.startswith("/") for f in files)
    module = sys.modules[_readahead.__name__].__spec__
    assert module is not None and (module.cached or module.origin) in files
    assert any("_multiarray_umath" in f and ".so" in f for f in files), numpy.__file__
    assert any("/libc.so" in f for f in files)  # mapped, though no module names it


def test_record_writes_once_and_keeps_what_other_runs_loaded(tmp_path: Path) -> None:
    manifest = tmp_path / "cache" / "startup" / "restore-run.files"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("/elsewhere/old.pyc\n")
    record(manifest)
    lines = manifest.read_text().splitlines()
    assert lines[: len(list(loaded_files()))] == list(loaded_files())
    assert lines[-1] == "/elsewhere/old.pyc"
    before = manifest.stat()
    record(manifest)  # nothing new loaded: not written again
    after = manifest.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not [p for p in manifest.parent.iterdir() if p.name.startswith(".")]


def test_record_is_bounded(tmp_path: Path) -> None:
    manifest = tmp_path / "x.files"
    manifest.write_text("".join(f"/old/{i}.pyc\n" for i in range(5000)))
    record(manifest)
    lines = manifest.read_text().splitlines()
    assert len(lines) == _readahead._MAX_FILES
    assert lines[0] == next(loaded_files())


def test_record_leaves_an_unwritable_cache_alone(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder would be")
    record(blocker / "startup" / "x.files")  # no error
    assert blocker.read_text() == "a file where the folder would be"


@pytest.mark.parametrize(
    "content",
    [b"", b"relative/path.pyc\n", b"\xff\xfe not text", b"/a\0b\n", b"/x.pyc\n" * (1 << 18)],
)
def test_a_useless_manifest_starts_no_thread(tmp_path: Path, content: bytes) -> None:
    manifest = tmp_path / "x.files"
    manifest.write_bytes(content)
    assert read_ahead(manifest) is None
    assert read_ahead(tmp_path / "missing.files") is None


def test_read_ahead_brings_the_listed_files_into_memory(tmp_path: Path) -> None:
    files = [_evicted(tmp_path / f"lib{i}.so") for i in range(3)]
    assert not any(map(_resident_pages, files)), f"{tmp_path}: pages stay cached (tmpfs?)"
    manifest = tmp_path / "x.files"
    manifest.write_text("".join(f"{f}\n" for f in [tmp_path / "gone.pyc", *files]))
    thread = read_ahead(manifest)
    assert thread is not None and thread.daemon
    thread.join(timeout=10)
    deadline = time.monotonic() + 10  # the kernel reads them in the background
    while any(_resident_pages(f) == 0 for f in files) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(_resident_pages(f) > 0 for f in files)


def test_only_regular_files_are_opened(tmp_path: Path) -> None:
    """A FIFO (opening one waits for a writer), a device or a symlink listed in a manifest
    is left alone: the thread gets through to the file after them."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    target = _evicted(tmp_path / "target.so")
    link.symlink_to(target)
    last = _evicted(tmp_path / "last.so")
    manifest = tmp_path / "x.files"
    manifest.write_text(f"{fifo}\n/dev/null\n{link}\n{last}\n")
    thread = read_ahead(manifest)
    assert thread is not None
    thread.join(timeout=10)
    assert not thread.is_alive()
    deadline = time.monotonic() + 10
    while _resident_pages(last) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _resident_pages(last) > 0
    assert _resident_pages(target) == 0  # not through the symlink
