"""Setting owner, mode, extended attributes and times on restored entries.

Each step is tried on its own; the failures are returned, not raised, so that
one refused attribute does not cost the others.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable
from typing import Any

from stratavault.sources._entry import EntryMetadata

__all__ = ["OwnerResolver", "apply_metadata", "apply_symlink_metadata"]

_ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")


class OwnerResolver:
    """Maps a recorded owner to local ids: by name when the name exists here, else numeric."""

    def __init__(self, *, numeric: bool = False) -> None:
        self._numeric = numeric
        self._uids: dict[tuple[str, int], int] = {}
        self._gids: dict[tuple[str, int], int] = {}

    def ids(self, meta: EntryMetadata) -> tuple[int, int]:
        """Return ``(uid, gid)`` to give the restored entry."""
        if self._numeric:
            return meta.uid, meta.gid
        key_u, key_g = (meta.user, meta.uid), (meta.group, meta.gid)
        uid = self._uids.get(key_u)
        if uid is None:
            uid = self._uids[key_u] = _lookup(pwd.getpwnam, meta.user, meta.uid)
        gid = self._gids.get(key_g)
        if gid is None:
            gid = self._gids[key_g] = _lookup(grp.getgrnam, meta.group, meta.gid)
        return uid, gid


def _lookup(getter: Callable[[str], Any], name: str, default: int) -> int:
    """Return the id (third field of a pwd/grp record) of ``name``, or ``default``."""
    if not name:
        return default
    try:
        entry = getter(name)
    except KeyError:
        return default
    return int(entry[2])


def apply_metadata(
    target: int | str, meta: EntryMetadata, owners: OwnerResolver
) -> list[tuple[str, OSError]]:
    """Set owner, mode, xattrs and times on ``target``, not a symbolic link.

    ``target`` is an open descriptor or a ``/proc/self/fd/N`` path of an
    ``O_PATH`` descriptor. Return ``(step, error)`` for every step that failed.
    """
    failures: list[tuple[str, OSError]] = []
    uid, gid = owners.ids(meta)
    _step(failures, "setting owner", os.chown, target, uid, gid)
    _step(failures, "setting mode", os.chmod, target, stat.S_IMODE(meta.mode))
    _set_xattrs(failures, target, meta, follow=True)
    _step(failures, "setting times", _utime, target, meta)
    return failures


def apply_symlink_metadata(
    dir_fd: int, name: bytes, meta: EntryMetadata, owners: OwnerResolver
) -> list[tuple[str, OSError]]:
    """Set owner, xattrs and times on symlink ``name`` in ``dir_fd`` (it has no mode)."""
    failures: list[tuple[str, OSError]] = []
    uid, gid = owners.ids(meta)
    _step(failures, "setting owner", _lchown_at, dir_fd, name, uid, gid)
    if meta.xattrs:
        _set_xattrs(failures, b"/proc/self/fd/%d/%s" % (dir_fd, name), meta, follow=False)
    _step(failures, "setting times", _lutime_at, dir_fd, name, meta)
    return failures


def _set_xattrs(
    failures: list[tuple[str, OSError]],
    target: int | str | bytes,
    meta: EntryMetadata,
    *,
    follow: bool,
) -> None:
    wanted = meta.xattrs
    try:
        present = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if wanted:
            failures.append(("listing xattrs", exc))
        return
    for name in present:  # ACLs inherited from a default ACL of the parent
        if name in _ACL_NAMES and name not in wanted:
            _step(failures, f"removing xattr {name}", _removexattr, target, name, follow)
    for name, value in wanted.items():
        _step(failures, f"setting xattr {name}", _setxattr, target, name, value, follow)


def _step(
    failures: list[tuple[str, OSError]], what: str, fn: Callable[..., object], *args: object
) -> None:
    try:
        fn(*args)
    except OSError as exc:
        failures.append((what, exc))


def _utime(target: int | str, meta: EntryMetadata) -> None:
    os.utime(target, ns=(meta.atime_ns, meta.mtime_ns))


def _lchown_at(dir_fd: int, name: bytes, uid: int, gid: int) -> None:
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def _lutime_at(dir_fd: int, name: bytes, meta: EntryMetadata) -> None:
    os.utime(name, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _setxattr(target: int | str | bytes, name: str, value: bytes, follow: bool) -> None:
    os.setxattr(target, name, value, follow_symlinks=follow)


def _removexattr(target: int | str | bytes, name: str, follow: bool) -> None:
    try:
        os.removexattr(target, name, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
