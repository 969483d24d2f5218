"""Safe names and directory descriptors below a restore target.

Every path inside the target is a sequence of names, each checked to be one
plain component. Directories are reached from the target's descriptor one
name at a time with ``O_NOFOLLOW | O_DIRECTORY``, so a symbolic link anywhere
in the target (restored earlier or already there) is never followed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Sequence

from stratavault.errors import RestoreError, UnsafePathError

__all__ = ["DirFds", "RelPath", "check_name", "display", "to_parts"]

RelPath = Sequence[bytes | str]
"""A path below the restore target as a sequence of names (``str`` with surrogateescape)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_name(name: bytes | str, *, where: str = "") -> bytes:
    """Return ``name`` as bytes if it is one safe path component, else raise ``UnsafePathError``.

    Refused: ``""``, ``"."``, ``".."``, and names holding ``"/"`` or NUL.
    ``where`` names the whole path in the message.
    """
    raw = os.fsencode(name) if isinstance(name, str) else name
    if raw in (b"", b".", b"..") or b"/" in raw or b"\0" in raw:
        path = where or os.fsdecode(raw)
        raise UnsafePathError(
            f"restoring {path!r} - name {os.fsdecode(raw)!r} would escape the restore target"
        )
    return raw


def display(parts: Sequence[bytes | str]) -> str:
    """Return a readable form of a path below the target (for messages)."""
    return "/".join(os.fsdecode(p) for p in parts)


_UNSAFE = (b"", b".", b"..")


def to_parts(path: RelPath) -> tuple[bytes, ...]:
    """Check every name of ``path`` and return them as bytes; raise ``UnsafePathError``."""
    if not path:
        raise UnsafePathError("restoring '' - an entry needs a name below the target")
    parts = tuple(os.fsencode(p) if isinstance(p, str) else p for p in path)
    for raw in parts:  # the common case stays cheap; the message is built only on failure
        if raw in _UNSAFE or b"/" in raw or b"\0" in raw:
            check_name(raw, where=display(path))
    return parts


class DirFds:
    """Directory descriptors below a target, opened safely and cached (LRU).

    Not thread-safe: the restorer calls it under its lock. A descriptor
    returned by :meth:`get` stays valid until the next call.
    """

    def __init__(self, target_fd: int, max_cached: int = 64) -> None:
        self._target_fd = target_fd
        self._max = max(2, max_cached)
        self._cache: OrderedDict[tuple[bytes, ...], int] = OrderedDict()

    def get(self, parts: tuple[bytes, ...]) -> int:
        """Return a descriptor of directory ``parts`` (``()`` is the target itself).

        Raise ``UnsafePathError`` if a name on the way is a symbolic link and
        ``RestoreError`` if one is missing or not a directory.
        """
        if not parts:
            return self._target_fd
        fd = self._cache.get(parts)
        if fd is not None:
            self._cache.move_to_end(parts)
            return fd
        parent = self.get(parts[:-1])
        try:
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _dir_error(parent, parts, exc) from exc
        self._cache[parts] = fd
        while len(self._cache) > self._max:
            _, old = self._cache.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        """Close every cached descriptor (not the target's)."""
        while self._cache:
            os.close(self._cache.popitem()[1])


def _dir_error(parent_fd: int, parts: tuple[bytes, ...], exc: OSError) -> RestoreError:
    where = display(parts)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(parent_fd, parts[-1]):
        return UnsafePathError(
            f"opening directory {where!r} in the restore target - it is a symbolic link, "
            "which restore never follows"
        )
    return RestoreError(f"opening directory {where!r} in the restore target - {exc.strerror}")


def _is_symlink(dir_fd: int, name: bytes) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
