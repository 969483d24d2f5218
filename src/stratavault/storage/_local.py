"""``LocalStorage``: objects as files under a folder (a local disk, NFS, a USB drive)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from stratavault.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    PermissionDeniedError,
    StorageError,
    StorageFullError,
)
from stratavault.storage._base import ObjectInfo, StorageProperties, check_name, put_file_content
from stratavault.storage._range import check_range

__all__ = ["TEMP_PREFIX", "LocalStorage"]

TEMP_PREFIX = ".tmp-"
"""Files being written start with this; no valid object name does, so ``list`` skips them."""

_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


class LocalStorage:
    """Objects are files under ``root``; name ``data/ab/abcd`` is the file ``root/data/ab/abcd``.

    Writes go to a temporary file in the target folder, are fsynced, then linked
    (create-if-absent, atomic) or renamed (overwrite) into place, and the folder is
    fsynced: a crash leaves either the whole object or none (maybe a stray temp file).
    Folders are created on demand, files and folders get the default mode minus the umask.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._properties = StorageProperties(location=str(self.root), staging_dir=str(self.root))

    @property
    def properties(self) -> StorageProperties:
        """Location is the root folder; conditional create and durable."""
        return self._properties

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data`` under ``name`` atomically (see ``Storage.put``)."""
        path = self._path(name)
        try:
            self._make_folders(path.parent)
            tmp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                self._write_temp(tmp, data)
                if overwrite:
                    os.replace(tmp, path)
                else:
                    os.link(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_folder(path.parent)
        except FileExistsError:
            raise ObjectExistsError(f"put {name} at {self.root} - object exists") from None
        except OSError as e:
            raise self._error("put", name, e) from e

    def put_file(self, name: str, path: str, *, overwrite: bool = False) -> None:
        """Store the file at ``path`` under ``name`` (see ``Storage.put_file``): fsynced,
        then linked into place, so a file on this file system is not copied (one on
        another is). ``path`` may be ``/proc/self/fd/N`` of an anonymous file
        (``O_TMPFILE``). Named files in the staging folder should start with
        ``TEMP_PREFIX``, so that ``list`` skips them."""
        dest = self._path(name)
        try:
            self._make_folders(dest.parent)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folder = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if not _link_in(folder, path, dest.name, overwrite=overwrite):
                    put_file_content(self, name, path, overwrite=overwrite)  # another disk
                    return
                os.fsync(folder)
            finally:
                os.close(folder)
        except FileExistsError:
            raise ObjectExistsError(f"put {name} at {self.root} - object exists") from None
        except OSError as e:
            raise self._error("put", name, e) from e

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return a range of ``name``, clipped at its end (see ``Storage.get``)."""
        path = self._path(name)
        check_range(name, offset, length)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = _regular_size(fd)
                end = size if length is None else min(size, offset + length)
                return _pread_all(fd, offset, max(0, end - offset))
            finally:
                os.close(fd)
        except OSError as e:
            raise self._error("get", name, e) from e

    def stat(self, name: str) -> ObjectInfo:
        """Name and size of ``name``."""
        path = self._path(name)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file")
        except OSError as e:
            raise self._error("stat", name, e) from e
        return ObjectInfo(name, st.st_size)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Walk the tree and yield objects whose names start with ``prefix``.

        Temporary files and entries that are not valid object names are skipped;
        symbolic links are followed.
        """
        folder, _, _ = prefix.rpartition("/")
        start = ""
        if folder:
            try:
                start = check_name(folder) + "/"
            except StorageError:
                return  # no valid object name has an empty or odd part
        try:
            yield from self._walk(self.root / start, start, prefix)
        except OSError as e:
            raise self._error("list", prefix or "/", e) from e

    def delete(self, name: str) -> None:
        """Remove ``name``; empty folders are left in place."""
        path = self._path(name)
        try:
            os.unlink(path)
            _fsync_folder(path.parent)
        except OSError as e:
            raise self._error("delete", name, e) from e

    def close(self) -> None:
        """Nothing to release."""

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _make_folders(self, folder: Path) -> None:
        """Create ``folder`` and missing parents, fsyncing each parent that got a new entry."""
        if folder.is_dir():
            return
        self._make_folders(folder.parent)
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, f"{folder} is an object, not a folder"
                ) from None
            return
        _fsync_folder(folder.parent)

    @staticmethod
    def _write_temp(tmp: Path, data: bytes | memoryview) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _walk(self, folder: Path, relative: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            name = relative + entry.name
            if entry.name.startswith(TEMP_PREFIX) or not _valid_part(entry.name):
                continue
            if not (name.startswith(prefix) or prefix.startswith(name + "/")):
                continue
            try:
                if entry.is_dir():
                    yield from self._walk(Path(entry.path), name + "/", prefix)
                elif entry.is_file() and name.startswith(prefix):
                    yield ObjectInfo(name, entry.stat().st_size)
            except FileNotFoundError:
                continue  # deleted while we walk

    def _error(self, operation: str, name: str, e: OSError) -> StorageError:
        where = f"{operation} {name} at {self.root}"
        if e.errno in _MISSING and operation != "put":
            return ObjectNotFoundError(f"{where} - no such object ({e.strerror})")
        if e.errno in _FULL:
            return StorageFullError(f"{where} - no space left ({e.strerror})")
        if e.errno in _DENIED:
            return PermissionDeniedError(f"{where} - permission denied ({e.strerror})")
        return StorageError(f"{where} - {e.strerror or e}")

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"


def _valid_part(part: str) -> bool:
    try:
        check_name(part)
    except StorageError:
        return False
    return True


def _regular_size(fd: int) -> int:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "not a regular file")
    return st.st_size


def _pread_all(fd: int, offset: int, size: int) -> bytes:
    """Read ``size`` bytes at ``offset``, fewer only if the file ends first."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    done = len(data)
    while done < size:
        part = os.pread(fd, size - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_in(folder: int, path: str, name: str, *, overwrite: bool) -> bool:
    """Hard-link the file at ``path`` as ``name`` in the open ``folder`` (following a
    ``/proc/self/fd`` link: a dir fd makes ``os.link`` use ``linkat`` with
    ``AT_SYMLINK_FOLLOW``); replace an existing ``name`` only with ``overwrite``. False
    when ``path`` is on another file system; ``FileExistsError`` when ``name`` exists."""
    tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    try:
        os.link(path, tmp, dst_dir_fd=folder)
    except OSError as e:
        if e.errno == errno.EXDEV:
            return False
        raise
    try:
        if overwrite:
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        else:
            os.link(tmp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
    return True
