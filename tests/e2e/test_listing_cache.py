"""The local listing cache: an unchanged folder's tree is known without reading the parent
snapshot's listing, and nothing stale is ever reused."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stratavault.jobs._file_readers as readers_module
from stratavault.jobs import (
    BackupFilesOptions,
    RestoreOptions,
    backup_files,
    list_entries,
    restore_files,
)
from stratavault.jobs._parent_trees import ParentTrees
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import Node, Snapshot, load_tree
from stratavault.storage import LocalStorage
from stratavault.types import ChunkId
from tests.e2e.fstree import build_sample_tree, describe


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    build_sample_tree(root)
    for i in range(40):
        folder = root / "many" / f"d{i % 5}" / f"e{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}").write_bytes(os.urandom(1000 + i))
    # A folder listed within the clock tick (4 ms or more) it was last changed in keeps an
    # access time equal to its change time, so its next listing moves the access time again
    # (relatime), and the backup after that would see a changed folder.
    time.sleep(0.05)
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    storage = LocalStorage(tmp_path / "repo")
    cache = tmp_path / "cache"
    with Repository.init(storage, b"pw", cache_dir=cache, kdf=KdfParams.fast()) as repo:
        yield repo


@pytest.fixture
def listings_read(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The parent listings each backup reads from the repository."""
    read: list[Any] = []
    real = ParentTrees._load

    def spy(self: ParentTrees, tree_id: Any) -> Any:
        if tree_id is not None:
            read.append(tree_id)
        return real(self, tree_id)

    monkeypatch.setattr(ParentTrees, "_load", spy)
    return read


def _backup(repo: Repository, src: Path, **options: Any) -> Snapshot:
    """A backup that walks in a child process, as one of a large tree does."""
    options.setdefault("walk_process_after_entries", 0)
    return backup_files(repo, BackupFilesOptions(paths=(src,), **options))


def _differences(
    repo: Repository, a: ChunkId | None, b: ChunkId | None, path: str = ""
) -> Iterator[str]:
    """What differs between two trees, node field by node field (for a failure's message)."""
    old = {n.name: n for n in load_tree(repo, a)} if a else {}
    new = {n.name: n for n in load_tree(repo, b)} if b else {}
    for name in sorted(old.keys() | new.keys()):
        x, y = old.get(name), new.get(name)
        if x is None or y is None:
            yield f"{path}/{name}: {'added' if x is None else 'removed'}"
            continue
        fields = [f.name for f in dataclasses.fields(x) if f.name != "subtree"]
        changed = [f"{f} {getattr(x, f)!r} -> {getattr(y, f)!r}" for f in fields
                   if getattr(x, f) != getattr(y, f)]  # fmt: skip
        if changed:
            yield f"{path}/{name}: " + ", ".join(changed)
        if x.subtree != y.subtree:
            yield from _differences(repo, x.subtree, y.subtree, f"{path}/{name}")


def _node_at(repo: Repository, snap: Snapshot, path: Path) -> Node:
    """The node a snapshot holds for `path`, found through the folders above it."""
    tree, node = snap.tree, None
    for name in path.parts[1:]:
        assert tree is not None
        node = next(n for n in load_tree(repo, tree) if n.name == name)
        tree = node.subtree
    assert node is not None
    return node


def _same_tree(repo: Repository, got: Snapshot, want: Snapshot, src: Path) -> None:
    """The two snapshots hold the same `src`, node and tree. The folders above it are left
    out: other tests running beside this one change /tmp and pytest's folders."""
    a, b = _node_at(repo, want, src), _node_at(repo, got, src)
    assert a == b, "\n".join(_differences(repo, want.tree, got.tree))


def _cache_files(repo: Repository) -> list[Path]:
    assert repo.cache_dir is not None
    return sorted((repo.cache_dir / "listings").glob("*.cache"))


def test_unchanged_tree_reads_no_listing_and_gives_the_same_tree(
    repo: Repository, src: Path, listings_read: list[Any]
) -> None:
    first = _backup(repo, src)
    assert len(_cache_files(repo)) == 1
    second = _backup(repo, src)  # reading files changed access times: new listings
    listings_read.clear()
    third = _backup(repo, src)
    assert listings_read == []  # every folder came from the cache
    _same_tree(repo, third, second, src)
    assert third.summary.files_unmodified == first.summary.files_new > 40
    assert (third.summary.files_new, third.summary.files_changed) == (0, 0)
    assert third.summary.dirs == second.summary.dirs
    assert third.summary.bytes_processed == second.summary.bytes_processed


def test_a_change_deep_down_is_backed_up_and_only_its_folders_are_read(
    repo: Repository, src: Path, listings_read: list[Any], tmp_path: Path
) -> None:
    _backup(repo, src)
    _backup(repo, src)
    deep = src / "many" / "d3" / "e0"
    changed = next(p for p in sorted(deep.iterdir()))
    changed.write_bytes(os.urandom(changed.stat().st_size))  # same size, new content
    (src / "many" / "d1" / "new").write_bytes(b"new file")
    listings_read.clear()
    snap = _backup(repo, src)
    assert (snap.summary.files_changed, snap.summary.files_new) == (1, 1)
    # The folders on the way to the two changes, no others: those above src (the way to
    # src's listing in the parent), src, many, d3, e0, d1.
    assert len(listings_read) == len(src.parents) + 5
    target = tmp_path / "restored"
    assert not restore_files(repo, snap, RestoreOptions(target=target, verify=True)).issues
    assert describe(target / src.relative_to("/")) == describe(src)


def test_metadata_change_of_a_folder_gives_a_new_tree(repo: Repository, src: Path) -> None:
    _backup(repo, src)
    before = _backup(repo, src)
    os.setxattr(src / "many" / "d2", "user.note", b"x")
    after = _backup(repo, src)
    assert after.tree != before.tree
    nodes = {p: n for p, n in list_entries(repo, after)}
    assert nodes[f"{src}/many/d2"].xattrs == {"user.note": b"x"}


def _old_cache_ignored(
    repo: Repository, src: Path, listings_read: list[Any], **options: Any
) -> Snapshot:
    listings_read.clear()
    snap = _backup(repo, src, **options)
    assert listings_read  # compared with the parent's listings instead
    return snap


def test_cache_is_not_used_after_the_index_was_replaced(
    repo: Repository, src: Path, listings_read: list[Any]
) -> None:
    """A prune or `repair index` may drop chunks: they replace index objects."""
    _backup(repo, src)
    second = _backup(repo, src)
    with repo.lock(exclusive=True):
        repo.rebuild_index()
    third = _old_cache_ignored(repo, src, listings_read)
    _same_tree(repo, third, second, src)
    listings_read.clear()
    _backup(repo, src)  # the cache written by the third backup is valid again
    assert listings_read == []


def test_cache_is_not_used_for_another_parent(
    repo: Repository, src: Path, listings_read: list[Any]
) -> None:
    first = _backup(repo, src)
    _backup(repo, src)
    listings_read.clear()
    _backup(repo, src)
    assert listings_read == []
    _old_cache_ignored(repo, src, listings_read, parent=first.id)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_cache_file_is_ignored(
    repo: Repository, src: Path, listings_read: list[Any], damage: str
) -> None:
    _backup(repo, src)
    second = _backup(repo, src)
    [path] = _cache_files(repo)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[len(data) - 70 :]
    else:
        data = bytearray(b"not a cache at all")
    path.write_bytes(bytes(data))
    third = _old_cache_ignored(repo, src, listings_read)
    _same_tree(repo, third, second, src)


def test_folder_with_an_unreadable_file_is_read_again(
    repo: Repository, src: Path, listings_read: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder whose file failed keeps no cache record: once the file can be read, the
    next backup reads it and the snapshot is complete."""
    victim = src / "many" / "d0" / "e0" / "f0"
    real = readers_module.chunk_files

    def failing(repo: Repository, paths: list[str], **kwargs: Any) -> Any:
        results = real(repo, paths, **kwargs)
        return [OSError(5, "Input/output error") if p == str(victim) else r
                for p, r in zip(paths, results, strict=True)]  # fmt: skip

    monkeypatch.setattr(readers_module, "chunk_files", failing)
    threads = {"processes_after_files": 10**9, "force_read": True}
    broken = _backup(repo, src, **threads)
    assert [e.path for e in broken.errors] == [str(victim)]
    _backup(repo, src, **threads)  # with force_read the cache is written, not used
    monkeypatch.setattr(readers_module, "chunk_files", real)
    listings_read.clear()
    fixed = _backup(repo, src, processes_after_files=10**9)
    assert not fixed.errors
    assert fixed.summary.files_new + fixed.summary.files_changed == 1
    assert len(listings_read) == len(src.parents) + 4  # and src, many, d0, e0
    node = {p: n for p, n in list_entries(repo, fixed)}[str(victim)]
    assert node.error is None and node.content


def test_xattrs_of_files_are_read_when_their_folder_changes(repo: Repository, src: Path) -> None:
    """The walking child reads extended attributes only for the entries it sends (a known
    folder's come from its tree): a changed folder's other files keep theirs, and a file
    whose attribute changes (its ctime changes too) is seen deep down."""
    keep = src / "many" / "d1" / "e0" / "f6"
    os.setxattr(keep, "user.keep", b"1")
    _backup(repo, src)
    _backup(repo, src)  # the listing cache now knows every folder
    (keep.parent / "new").write_bytes(b"new file beside the one with an xattr")
    deep = src / "many" / "d3" / "e1" / "f13"
    os.setxattr(deep, "user.note", b"v1")
    changed = _backup(repo, src)
    nodes = {p: n for p, n in list_entries(repo, changed)}
    assert nodes[str(keep)].xattrs == {"user.keep": b"1"}
    assert nodes[str(deep)].xattrs == {"user.note": b"v1"}
    os.setxattr(deep, "user.note", b"v2")  # same size and times, another value
    again = {p: n for p, n in list_entries(repo, _backup(repo, src))}
    assert again[str(deep)].xattrs == {"user.note": b"v2"}
    assert again[str(keep)].xattrs == {"user.keep": b"1"}
