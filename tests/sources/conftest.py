"""Fixtures for the file system source tests: real trees under tmp_path, as root."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stratavault.sources import FsEntry, FsRestorer, SparseFileReader, walk


class Errors(list[tuple[Path, OSError]]):
    """Collects what the walker reports through ``on_error``."""

    def __call__(self, path: Path, exc: OSError) -> None:
        self.append((path, exc))


@pytest.fixture
def errors() -> Errors:
    return Errors()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def restore_walked(entries: list[FsEntry], base: Path, restorer: FsRestorer) -> None:
    """Restore walked entries below ``restorer``'s target, paths relative to ``base``."""
    first_of_inode: dict[tuple[int, int], tuple[bytes, ...]] = {}
    for entry in entries:
        rel = tuple(os.fsencode(p) for p in Path(entry.path).relative_to(base).parts)
        if entry.type != "file":
            restorer.make_entry(rel, entry)
            continue
        key = (entry.dev, entry.inode)
        if entry.nlink > 1 and key in first_of_inode:
            assert restorer.make_hardlink(rel, first_of_inode[key])
            continue
        first_of_inode[key] = rel
        handle = restorer.create_file(rel, entry)
        assert handle is not None, restorer.issues
        with SparseFileReader(entry.path) as reader:
            for offset, data in reader.extents():
                handle.write_at(offset, data)
        restorer.finish_file(handle)


def comparable(entry: FsEntry) -> tuple[object, ...]:
    """The metadata a restore must bring back (atime of directories changes when read)."""
    atime = entry.atime_ns if entry.type != "dir" else None
    return (
        entry.name, entry.type, entry.mode, entry.uid, entry.gid, entry.user, entry.group,
        entry.size if entry.type != "dir" else None, entry.mtime_ns, atime, entry.nlink,
        entry.rdev, entry.link_target, dict(entry.xattrs),
    )  # fmt: skip


def walk_all(
    root: Path,
    on_error: Callable[[Path, OSError], None] | None = None,
    *,
    walker: Callable[..., Iterator[FsEntry]] = walk,
) -> list[FsEntry]:
    def fail(path: Path, exc: OSError) -> None:
        raise AssertionError(f"unexpected walk error at {path}: {exc}")

    return list(walker([root], on_error=on_error or fail))
