"""No name from a snapshot may make restore write outside the target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stratavault.errors import UnsafePathError
from stratavault.sources import FsRestorer, check_name
from tests.sources.test_restore import Meta


def listing(root: Path) -> dict[str, bytes | str]:
    """Everything below ``root`` (symlinks not followed): path -> content or link target."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = path.read_bytes()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """A target and, next to it, an 'outside' directory that must stay untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_bytes(b"original")
    return tmp_path / "target", outside


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "/", "x\0y", b"..", b"a/..", b"\0"])
def test_unsafe_names_are_refused(name: str | bytes) -> None:
    with pytest.raises(UnsafePathError, match="escape"):
        check_name(name)


def test_safe_names_pass() -> None:
    assert check_name("...") == b"..."
    assert check_name(b"\xff.") == b"\xff."
    assert check_name(os.fsdecode(b"\xfe")) == b"\xfe"


@pytest.mark.parametrize(
    "path",
    [[".."], ["..", "x"], ["..", "outside", "x"], ["/tmp/outside-abs"], ["a/../../x"], [], ["."]],
)
def test_escaping_paths_are_refused_for_every_kind(
    world: tuple[Path, Path], path: list[str]
) -> None:
    target, _outside = world
    target.mkdir()
    before = listing(target.parent)
    with FsRestorer(target) as restorer:
        assert not restorer.make_dir(path, Meta(type="dir"))
        assert restorer.create_file(path, Meta(size=4)) is None
        assert not restorer.make_entry(path, Meta(type="symlink", link_target="/etc"))
        assert not restorer.make_entry(path, Meta(type="fifo"))
        assert not restorer.make_hardlink(path, ["whatever"])
    assert all(isinstance(i.error, UnsafePathError) for i in restorer.issues)
    assert len(restorer.issues) == 5
    assert listing(target.parent) == before
    assert not Path("/tmp/outside-abs").exists()


def test_symlink_then_file_below_it(world: tuple[Path, Path]) -> None:
    target, outside = world
    with FsRestorer(target) as restorer:
        assert restorer.make_entry(["d"], Meta(type="symlink", link_target=str(outside)))
        assert restorer.create_file(["d", "x"], Meta(size=4)) is None
        assert restorer.create_file(["d", "new"], Meta(size=4)) is None
        assert not restorer.make_dir(["d", "sub"], Meta(type="dir"))
        assert not restorer.make_entry(["d", "l"], Meta(type="symlink", link_target="/"))
    assert [type(i.error) for i in restorer.issues] == [UnsafePathError] * 4
    assert "symbolic link" in str(restorer.issues[0])
    assert listing(outside) == {"x": b"original"}
    assert os.readlink(target / "d") == str(outside)


def test_symlink_then_directory_of_the_same_name(world: tuple[Path, Path]) -> None:
    target, outside = world
    with FsRestorer(target) as restorer:
        assert restorer.make_entry(["d"], Meta(type="symlink", link_target=str(outside)))
        assert restorer.make_dir(["d"], Meta(type="dir"))
        handle = restorer.create_file(["d", "x"], Meta(size=4))
        assert handle is not None
        handle.write_at(0, b"evil")
        restorer.finish_file(handle)
    assert restorer.issues == []
    assert listing(outside) == {"x": b"original"}
    assert (target / "d").is_dir() and not (target / "d").is_symlink()
    assert (target / "d" / "x").read_bytes() == b"evil"


def test_symlink_then_file_of_the_same_name(world: tuple[Path, Path]) -> None:
    target, outside = world
    with FsRestorer(target) as restorer:
        assert restorer.make_entry(["f"], Meta(type="symlink", link_target=str(outside / "x")))
        handle = restorer.create_file(["f"], Meta(size=4))
        assert handle is not None
        handle.write_at(0, b"evil")
        restorer.finish_file(handle)
        restorer.make_entry(["g"], Meta(type="symlink", link_target=str(outside / "x")))
        assert restorer.make_entry(["g"], Meta(type="fifo", mode=0o666))
    assert listing(outside) == {"x": b"original"}
    assert (target / "f").read_bytes() == b"evil"
    assert os.stat(outside / "x").st_mode & 0o777 != 0o666


def test_pre_existing_symlink_in_target(world: tuple[Path, Path]) -> None:
    target, outside = world
    target.mkdir()
    (target / "d").symlink_to(outside)
    with FsRestorer(target) as restorer:
        assert restorer.create_file(["d", "x"], Meta(size=4)) is None
        restorer.finish_dir(["d"])  # not a restored directory: nothing happens
    assert isinstance(restorer.issues[0].error, UnsafePathError)
    assert listing(outside) == {"x": b"original"}


def test_hard_links_only_to_entries_restored_in_this_run(world: tuple[Path, Path]) -> None:
    target, outside = world
    target.mkdir()
    os.link(outside / "x", target / "preexisting")
    with FsRestorer(target) as restorer:
        assert not restorer.make_hardlink(["l"], ["preexisting"])
        assert not restorer.make_hardlink(["l2"], ["..", "outside", "x"])
    assert "not restored in this run" in str(restorer.issues[0])
    assert isinstance(restorer.issues[1].error, UnsafePathError)
    assert not (target / "l").exists() and not (target / "l2").exists()


def test_file_swapped_for_a_symlink_between_writes(world: tuple[Path, Path]) -> None:
    target, outside = world
    with FsRestorer(target, max_open_files=1) as restorer:
        a = restorer.create_file(["a"], Meta(size=4))
        b = restorer.create_file(["b"], Meta(size=4))  # evicts a's descriptor
        assert a is not None and b is not None
        os.unlink(target / "a")
        (target / "a").symlink_to(outside / "x")  # someone else swaps it meanwhile
        a.write_at(0, b"evil")
        assert a.failed
        restorer.finish_file(a)
        restorer.finish_file(b)
    assert listing(outside) == {"x": b"original"}
    assert restorer.issues and restorer.issues[0].path == "a"


def test_symlink_targets_are_stored_not_followed(world: tuple[Path, Path]) -> None:
    target, outside = world
    with FsRestorer(target) as restorer:
        restorer.make_entry(["l"], Meta(type="symlink", link_target="../outside/x", mode=0o600))
    assert os.readlink(target / "l") == "../outside/x"
    assert listing(outside) == {"x": b"original"}
    assert os.stat(outside / "x").st_mtime_ns != Meta().mtime_ns
