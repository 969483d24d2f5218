"""File-level restore: walk, look up and read a filesystem inside a disk image, safely.

A filesystem in a backup is untrusted input. What this module guarantees to its callers:

- every name it yields is one plain component (no ``""``, ``.``, ``..``, ``/`` or NUL);
  an entry with a bad name is reported (``on_error``) with its path and left out, with
  everything below it;
- a folder that is its own ancestor (a corrupt directory graph) is reported, not entered;
- paths asked for are resolved inside the filesystem only: a symlink in the middle of the
  path is followed relative to that filesystem's root (never the host's), at most
  :data:`MAX_SYMLINK_HOPS` times (``SourceError`` naming the path: a loop); the last
  component is never followed (a symlink is listed and restored as a symlink);
- a file's stream yields exactly ``entry.size`` bytes, or raises ``SourceError`` naming it.

Walking holds one folder's listing per level of depth (not the whole tree).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stratavault.errors import SourceError, UnsafePathError
from stratavault.sources._flr_fs import BROKEN, FlrEntry, FlrFilesystem
from stratavault.types import EntryType

__all__ = [
    "MAX_SYMLINK_HOPS",
    "FlrEvent",
    "flr_lookup",
    "flr_read",
    "flr_walk",
    "unsafe_name",
]

MAX_SYMLINK_HOPS = 40
"""Symlinks followed while resolving one path (Linux: 40) before it is called a loop."""
READ_BLOCK_BYTES = 8 << 20
MAX_DEPTH = 4096

FlrErrorHandler = Callable[[str, Exception], None]
"""Called with the path and the error of an entry that is left out."""


@dataclass(frozen=True, slots=True)
class FlrEvent:
    """One step of :func:`flr_walk`: an entry (``leave`` False) or the end of a folder's
    entries (``leave`` True, for the folder itself: set its metadata now)."""

    parts: tuple[str, ...]
    """Names from the walk's start (``()`` for the start folder itself)."""
    entry: FlrEntry
    leave: bool = False

    @property
    def path(self) -> str:
        """The parts joined with ``/``."""
        return "/".join(self.parts)


def unsafe_name(name: str) -> bool:
    """Whether ``name`` is not one plain path component."""
    return name in ("", ".", "..") or "/" in name or "\0" in name


def _show(parts: tuple[str, ...] | list[str]) -> str:
    return "/" + "/".join(parts)


def flr_lookup(fs: FlrFilesystem, path: str, *, where: str) -> tuple[list[str], FlrEntry]:
    """The entry at ``path`` (``/``-separated, from the filesystem root) and its resolved
    path as names; the last component is not followed when it is a symlink.

    ``SourceError`` (naming ``where`` and the path) when it does not exist, a middle part
    is not a folder, or symlinks loop.
    """
    todo = [p for p in path.split("/") if p not in ("", ".")]
    todo.reverse()
    stack: list[tuple[str, FlrEntry]] = []
    root = fs.root()
    hops = 0
    while todo:
        name = todo.pop()
        if name == "..":
            if stack:
                stack.pop()
            continue
        folder = stack[-1][1] if stack else root
        shown = _show([n for n, _ in stack] + [name])
        if folder.type != EntryType.DIR:
            raise SourceError(
                f"looking up {shown} on {where} - {_show([n for n, _ in stack])} is not a folder"
            )
        entry = _find(fs, folder, name, shown, where)
        if entry.type == EntryType.SYMLINK and todo:  # a middle part: follow, inside the fs
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise SourceError(
                    f"looking up {path} on {where} - too many symlinks (a loop) at {shown}"
                )
            target = entry.link_target or ""
            if target.startswith("/"):
                stack.clear()
            todo.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        stack.append((name, entry))
    return [n for n, _ in stack], stack[-1][1] if stack else root


def _find(fs: FlrFilesystem, folder: FlrEntry, name: str, shown: str, where: str) -> FlrEntry:
    fold = fs.kind.startswith(("fat", "ntfs"))  # names match without regard to case
    try:
        found = next(
            (e for e in fs.iterdir(folder) if e.name == name or (fold and _same(e.name, name))),
            None,
        )
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"reading folder of {shown} on {where} - corrupt: {exc}") from exc
    if found is None:
        raise SourceError(f"looking up {shown} on {where} - no such file or folder")
    if found.type == BROKEN:
        raise SourceError(f"looking up {shown} on {where} - corrupt: {found.node}")
    return found


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def flr_walk(
    fs: FlrFilesystem,
    start: FlrEntry,
    on_error: FlrErrorHandler,
    *,
    recursive: bool = True,
) -> Iterator[FlrEvent]:
    """Entries below folder ``start``, parents first (depth first, on-disk order).

    After the last entry of each folder (``start`` included) comes a ``leave`` event for
    it. Bad names, folder loops and unreadable folders go to ``on_error`` (path below
    ``start`` and a ``SourceError``/``UnsafePathError``) and are left out.
    """
    seen = {start.inode} if start.inode else set()
    stack: list[tuple[tuple[str, ...], FlrEntry, Iterator[FlrEntry]]] = [
        ((), start, _listing(fs, start, (), on_error))
    ]
    while stack:
        parts, folder, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            seen.discard(folder.inode)
            yield FlrEvent(parts, folder, leave=True)
            continue
        here = (*parts, entry.name)
        if unsafe_name(entry.name):
            shown = _show(parts).rstrip("/") + "/" + repr(entry.name)
            on_error(
                shown,
                UnsafePathError(
                    f"reading {shown} - name {entry.name!r} would escape the restore target"
                ),
            )
            continue
        if entry.type == BROKEN:
            on_error(_show(here), SourceError(f"reading {_show(here)} - corrupt: {entry.node}"))
            continue
        yield FlrEvent(here, entry)
        if entry.type != EntryType.DIR or not recursive:
            continue
        if (entry.inode and entry.inode in seen) or len(stack) > MAX_DEPTH:
            on_error(
                _show(here),
                SourceError(
                    f"reading folder {_show(here)} - it contains itself (corrupt directory graph)"
                ),
            )
            continue
        seen.add(entry.inode)
        stack.append((here, entry, _listing(fs, entry, here, on_error)))


def _listing(
    fs: FlrFilesystem, folder: FlrEntry, parts: tuple[str, ...], on_error: FlrErrorHandler
) -> Iterator[FlrEntry]:
    try:
        yield from fs.iterdir(folder)
    except Exception as exc:
        on_error(_show(parts), SourceError(f"reading folder {_show(parts)} - corrupt: {exc}"))


def flr_read(
    fs: FlrFilesystem, entry: FlrEntry, *, path: str, block_bytes: int = READ_BLOCK_BYTES
) -> Iterator[bytes]:
    """The content of regular file ``entry`` in blocks of ``block_bytes`` (the last shorter).

    ``SourceError`` naming ``path`` when the filesystem cannot give exactly ``entry.size``
    bytes (a corrupt extent map, a truncated image).
    """
    done = 0
    try:
        stream = fs.open(entry)
        while done < entry.size:
            data = stream.read(min(block_bytes, entry.size - done))
            if not data:
                break
            done += len(data)
            yield data
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"reading {path} at byte {done} - corrupt: {exc}") from exc
    if done != entry.size:
        raise SourceError(f"reading {path} - {done} of {entry.size} bytes, then nothing (corrupt)")
