"""Folder states: keys are a keyed BLAKE2b of the folder's path and its entries' states,
and what a folder holds until its key is known comes back exactly as it was fed."""

from __future__ import annotations

import hashlib
import marshal
from pathlib import Path

from stratavault.sources import FolderDone, FolderStates, FsEntry, KnownFolder, walk
from stratavault.sources._entry import UNREAD_XATTRS
from stratavault.sources._folder_states import _state

SECRET = b"s" * 32


def _tree(root: Path) -> None:
    (root / "a" / "deep").mkdir(parents=True)
    for i in range(300):  # a folder holding many entries until its key is known
        (root / "a" / f"f{i:03d}").write_bytes(b"x" * i)
    (root / "a" / "deep" / "g").write_text("g")
    (root / "b").mkdir()
    (root / "b" / "link").symlink_to("../a/f001")


def _reference_key(entries: list[FsEntry], folder: FsEntry, keys: dict[str, bytes | None]) -> bytes:
    """The key as first defined: over ``marshal.dumps`` of the list of state tuples."""
    states = []
    for e in entries:
        if e.parent == folder.path:
            states.append((*_state(e), keys[e.path]) if e.path in keys else _state(e))
    data = (folder.path.encode() + b"\0") + marshal.dumps(states, 2)
    return hashlib.blake2b(data, key=SECRET, digest_size=32).digest()


def test_keys_and_held_entries(tmp_path: Path) -> None:
    _tree(tmp_path)
    entries = list(walk([tmp_path], on_error=lambda *_: None, xattrs=False))
    assert all(e.xattrs is UNREAD_XATTRS for e in entries)
    states = FolderStates(set(), SECRET)
    out = [r for e in entries for r in states.feed(e)] + states.finish()
    passed = [r for r in out if isinstance(r, FsEntry)]
    assert passed == entries  # every entry, in walk order, as it was fed
    assert all(e.xattrs is UNREAD_XATTRS for e in passed)  # still to be read
    keys = {r.path: r.key for r in out if isinstance(r, FolderDone)}
    for folder in [e for e in entries if e.type == "dir"][::-1]:  # deepest first
        assert keys[folder.path] == _reference_key(entries, folder, keys), folder.path


def test_a_known_folder_replaces_its_entries(tmp_path: Path) -> None:
    _tree(tmp_path)
    entries = list(walk([tmp_path], on_error=lambda *_: None, xattrs=False))
    first = FolderStates(set(), SECRET)
    out = [r for e in entries for r in first.feed(e)] + first.finish()
    known = {r.path: r.key for r in out if isinstance(r, FolderDone) and r.key is not None}
    a = str(tmp_path / "a")
    again = FolderStates({known[a], known[a + "/deep"]}, SECRET)  # "a" and all below it
    out = [r for e in entries for r in again.feed(e)] + again.finish()
    (folder,) = [r for r in out if isinstance(r, KnownFolder)]
    assert folder.entry.path == str(tmp_path / "a") and folder.files == 301
    assert not any(
        isinstance(r, FsEntry) and r.path.startswith(folder.entry.path + "/") for r in out
    )


def test_a_big_folder_goes_to_the_consumer_in_batches(tmp_path: Path) -> None:
    """A folder of thousands of entries released at once is sent in several messages."""
    from stratavault.sources import _walk_process as wp

    big = tmp_path / "big"
    big.mkdir()
    for i in range(3 * wp._BATCH):
        (big / f"f{i:05d}").touch()
    entries = list(walk([tmp_path], on_error=lambda *_: None, xattrs=False))

    class Walked:
        def entries(self, on_error: object) -> list[FsEntry]:
            return entries

    class Conn:
        sent: list[list[tuple[int, object]]] = []

        def send(self, batch: list[tuple[int, object]]) -> None:
            self.sent.append(list(batch))

        def close(self) -> None:
            pass

    conn = Conn()
    wp._send_records(conn, Walked(), (set(), SECRET))  # type: ignore[arg-type]
    assert max(len(b) for b in conn.sent) <= wp._BATCH + 1  # + the end marker
    paths = [v[0] for b in conn.sent for k, v in b if k == wp._ENTRY]  # type: ignore[index]
    assert paths == [e.path for e in entries]
