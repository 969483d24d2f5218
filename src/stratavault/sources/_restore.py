"""Writing a restored tree into a target directory, safely and in any order.

Call order for one restore (paths are sequences of names below the target)::

    FsRestorer(target)
      -> ( make_dir | make_entry | make_hardlink | create_file -> RestoreFile )*   tree order
      -> ( RestoreFile.write_at )*        any order, any thread, also interleaved
      -> ( finish_file | finish_dir )*    a directory after every entry in it was created
      -> close() -> issues

A parent directory must have been created (or already exist) before its
entries. Directories get their metadata in :meth:`FsRestorer.finish_dir`, or
at :meth:`FsRestorer.close` deepest first, so their mtimes stick.
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import numpy as np

from stratavault.errors import RestoreError
from stratavault.sources._entry import EntryMetadata, EntryType
from stratavault.sources._restore_meta import (
    OwnerResolver,
    apply_metadata,
    apply_symlink_metadata,
)
from stratavault.sources._safe_dirs import DirFds, RelPath, display, to_parts

__all__ = ["ZEROS", "FsRestorer", "RestoreFile", "RestoreIssue"]

ZEROS = bytes(1 << 20)
"""A preallocated zero buffer: ``ZEROS.startswith(buf)`` tells fast whether ``buf`` is all zeros."""

_HOLE_BLOCK_BYTES = 4096  # zero runs this long and aligned like this are left as holes
_READ_BACK_BYTES = 8 << 20
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN_FILE = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RestoreIssue:
    """An entry that could not be restored fully: its path below the target and why."""

    path: str
    error: RestoreError

    def __str__(self) -> str:
        return str(self.error)


class RestoreFile:
    """A regular file being restored; its content may arrive in any order from any thread.

    Created by :meth:`FsRestorer.create_file` with its final size and nothing
    but holes; :meth:`write_at` fills in data, :meth:`FsRestorer.finish_file`
    sets its metadata. The descriptor may be closed in between when too many
    files are open and is reopened (safely) on the next write.
    """

    def __init__(
        self, restorer: FsRestorer, parts: tuple[bytes, ...], meta: EntryMetadata, inode: int
    ) -> None:
        self.meta = meta
        self.failed = False
        """True once a write failed; later writes are ignored, the issue is recorded."""
        self._restorer = restorer
        self._parts = parts
        self._inode = inode
        self._lock = threading.Lock()
        self._fd = -1
        self._finished = False

    @property
    def path(self) -> str:
        """The file's path below the target, readable (for messages)."""
        return display(self._parts)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data`` at ``offset``; aligned all-zero blocks are skipped and stay holes.
        False when the file failed (now or before): the error is recorded once."""
        view = memoryview(data).cast("B")
        with self._lock:
            if self.failed:
                return False
            if self._finished:
                raise RestoreError(f"writing {self.path!r} - the file was already finished")
            try:
                fd = self._restorer._file_fd(self)
                for piece_offset, piece in _nonzero_pieces(view, offset):
                    _pwrite_all(fd, piece, piece_offset)
            except (OSError, RestoreError) as exc:
                self.failed = True
                self._restorer._record(self._parts, "writing", exc)
                return False
            return True


class FsRestorer:
    """Restores entries below ``target`` without ever writing outside it.

    Every name is checked (:func:`check_name`); every entry is created relative
    to a descriptor of its parent reached from the target without following
    symbolic links; an existing non-directory in the way is replaced, never
    written through. Errors of one entry are recorded in :attr:`issues` and the
    restore goes on; methods that create something return whether they did.
    Thread-safe. Owners are restored by name when the name exists here, else by
    number (always by number with ``numeric_owner``).
    """

    def __init__(
        self,
        target: Path,
        *,
        numeric_owner: bool = False,
        max_open_files: int = 256,
        max_cached_dirs: int = 64,
    ) -> None:
        try:
            target.mkdir(parents=True, exist_ok=True)
            self._target_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise RestoreError(f"opening restore target {target} - {exc.strerror}") from exc
        self.target = target
        self.issues: list[RestoreIssue] = []
        """Entries that failed, fully or in part (path and error)."""
        self.skipped: list[RestoreIssue] = []
        """Entries left out on purpose (sockets), with the reason."""
        self._owners = OwnerResolver(numeric=numeric_owner)
        self._dirs = DirFds(self._target_fd, max_cached_dirs)
        self._lock = threading.RLock()
        self._pending_dirs: dict[tuple[bytes, ...], EntryMetadata] = {}
        self._linkable: set[tuple[bytes, ...]] = set()
        self._open_files: OrderedDict[RestoreFile, None] = OrderedDict()
        self._max_open = max(1, max_open_files)
        self._unfinished: set[RestoreFile] = set()

    def __enter__(self) -> FsRestorer:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- creating entries ------------------------------------------------------------------

    def make_dir(self, path: RelPath, meta: EntryMetadata) -> bool:
        """Create directory ``path`` (an existing one is kept); its metadata waits for finish."""
        try:
            parts = to_parts(path)
            with self._lock:
                dfd = self._dirs.get(parts[:-1])
                name = parts[-1]
                try:
                    os.mkdir(name, 0o700, dir_fd=dfd)
                except FileExistsError:
                    if not stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                        os.unlink(name, dir_fd=dfd)
                        os.mkdir(name, 0o700, dir_fd=dfd)
                self._pending_dirs[parts] = meta
            return True
        except (OSError, RestoreError) as exc:
            self._record(path, "creating directory", exc)
            return False

    def make_entry(self, path: RelPath, meta: EntryMetadata) -> bool:
        """Create a directory, symlink, FIFO or device node as ``meta.type`` says.

        Sockets are not restored (noted in :attr:`skipped`); regular files go
        through :meth:`create_file`.
        """
        kind = meta.type
        if kind == EntryType.DIR:
            return self.make_dir(path, meta)
        if kind == EntryType.SOCKET:
            why = RestoreError(f"restoring {display(path)!r} - sockets are not restored")
            self.skipped.append(RestoreIssue(display(path), why))
            return False
        if kind == EntryType.SYMLINK:
            return self._make_symlink(path, meta)
        if kind in (EntryType.FIFO, EntryType.CHARDEV, EntryType.BLOCKDEV):
            return self._make_node(path, meta)
        self._record(path, "creating", RestoreError(f"entry type {kind!r} is not supported here"))
        return False

    def make_hardlink(self, path: RelPath, existing: RelPath) -> bool:
        """Create ``path`` as a hard link to ``existing``, a non-directory restored earlier."""
        try:
            parts, source = to_parts(path), to_parts(existing)
            with self._lock:
                if source not in self._linkable:
                    raise RestoreError(
                        f"linking {display(parts)!r} to {display(source)!r} - "
                        "the link source was not restored in this run"
                    )
                src_fd = os.dup(self._dirs.get(source[:-1]))
                try:
                    dst_fd = self._dirs.get(parts[:-1])
                    self._create(
                        dst_fd,
                        parts[-1],
                        lambda: os.link(
                            source[-1],
                            parts[-1],
                            src_dir_fd=src_fd,
                            dst_dir_fd=dst_fd,
                            follow_symlinks=False,
                        ),
                    )
                finally:
                    os.close(src_fd)
                self._linkable.add(parts)
            return True
        except (OSError, RestoreError) as exc:
            self._record(path, "creating hard link", exc)
            return False

    def adopt(self, path: RelPath) -> None:
        """Take ``path``, a non-directory that another restorer of this target (in a worker
        process) created in this run, as restored here: it may be a hard link's source."""
        parts = to_parts(path)
        with self._lock:
            self._linkable.add(parts)

    def create_file(self, path: RelPath, meta: EntryMetadata) -> RestoreFile | None:
        """Create regular file ``path`` with ``meta.size`` bytes of holes; ``None`` on failure."""
        try:
            parts = to_parts(path)
            with self._lock:
                dfd = self._dirs.get(parts[:-1])
                name = parts[-1]
                fd = self._create(dfd, name, lambda: os.open(name, _NEW_FILE, 0o600, dir_fd=dfd))
                try:
                    os.ftruncate(fd, meta.size)
                    handle = RestoreFile(self, parts, meta, os.fstat(fd).st_ino)
                except BaseException:
                    os.close(fd)
                    raise
                handle._fd = fd
                self._open_files[handle] = None
                self._unfinished.add(handle)
                self._evict(keep=handle)
                if meta.nlink > 1:  # only what may be linked to is remembered
                    self._linkable.add(parts)
            return handle
        except (OSError, RestoreError) as exc:
            self._record(path, "creating file", exc)
            return None

    # ---- finishing -------------------------------------------------------------------------

    def finish_file(self, handle: RestoreFile) -> None:
        """Set the file's owner, mode, xattrs and times, and close it (once all data is
        written). A file whose writing failed keeps the marks of an unfinished one (mode
        0600, the time of the restore), so it cannot pass for a restored file."""
        with handle._lock:
            if handle._finished:
                return
            handle._finished = True
            if not handle.failed:
                self._set_file_metadata(handle)
            with self._lock:
                self._close_file(handle)
                self._unfinished.discard(handle)

    def _set_file_metadata(self, handle: RestoreFile) -> None:
        try:
            fd = self._file_fd(handle)
        except (OSError, RestoreError) as exc:
            self._record(handle._parts, "setting metadata", exc)
            return
        for step, err in apply_metadata(fd, handle.meta, self._owners):
            self._record(handle._parts, step, err)

    def finish_dir(self, path: RelPath) -> None:
        """Set a directory's metadata now; call it after every entry in it was created."""
        try:
            parts = to_parts(path)
            with self._lock:
                meta = self._pending_dirs.pop(parts, None)
                if meta is not None:
                    fd = self._dirs.get(parts)
                    for step, err in apply_metadata(fd, meta, self._owners):
                        self._record(parts, step, err)
        except (OSError, RestoreError) as exc:
            self._record(path, "setting metadata", exc)

    def close(self) -> list[RestoreIssue]:
        """Finish the directories still pending (deepest first), close everything, return issues.

        Files created but never finished are recorded as issues.
        """
        with self._lock:
            for parts in sorted(self._pending_dirs, key=len, reverse=True):
                self.finish_dir(parts)
            for handle in list(self._unfinished):
                never = RestoreError("the file was never finished")
                self._record(handle._parts, "restoring", never)
                self._close_file(handle)
            self._unfinished.clear()
            self._dirs.close()
            if self._target_fd >= 0:
                os.close(self._target_fd)
                self._target_fd = -1
        return self.issues

    # ---- reading back ----------------------------------------------------------------------

    def read_back(self, path: RelPath) -> Iterator[bytes]:
        """Yield the content of restored regular file ``path`` (symlinks are not followed)."""
        parts = to_parts(path)
        with self._lock:
            dfd = self._dirs.get(parts[:-1])
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                raise _os_error(parts, "reading back", exc) from exc
        try:
            while data := os.read(fd, _READ_BACK_BYTES):
                yield data
        finally:
            os.close(fd)

    def verify_file(
        self, path: RelPath, digest: Callable[[Iterable[bytes]], bytes], expected: bytes
    ) -> bool:
        """Re-read ``path``, hash it with ``digest`` and compare; a mismatch is an issue."""
        try:
            actual = digest(self.read_back(path))
        except (OSError, RestoreError) as exc:
            self._record(path, "verifying", exc)
            return False
        if actual != expected:
            self._record(path, "verifying", RestoreError("content differs from the snapshot"))
            return False
        return True

    # ---- internals -------------------------------------------------------------------------

    def _make_symlink(self, path: RelPath, meta: EntryMetadata) -> bool:
        try:
            parts = to_parts(path)
            if meta.link_target is None:
                raise RestoreError(f"restoring symlink {display(parts)!r} - it has no target")
            target = os.fsencode(meta.link_target)
            with self._lock:
                dfd = self._dirs.get(parts[:-1])
                name = parts[-1]
                self._create(dfd, name, lambda: os.symlink(target, name, dir_fd=dfd))
                if meta.nlink > 1:  # only what may be linked to is remembered
                    self._linkable.add(parts)
                for step, err in apply_symlink_metadata(dfd, name, meta, self._owners):
                    self._record(parts, step, err)
            return True
        except (OSError, RestoreError) as exc:
            self._record(path, "creating symlink", exc)
            return False

    def _make_node(self, path: RelPath, meta: EntryMetadata) -> bool:
        kinds = {EntryType.FIFO: stat.S_IFIFO, EntryType.CHARDEV: stat.S_IFCHR}
        fmt = kinds.get(EntryType(meta.type), stat.S_IFBLK)
        try:
            parts = to_parts(path)
            with self._lock:
                dfd = self._dirs.get(parts[:-1])
                name = parts[-1]
                rdev = meta.rdev if fmt != stat.S_IFIFO else 0
                self._create(dfd, name, lambda: os.mknod(name, fmt | 0o600, rdev, dir_fd=dfd))
                if meta.nlink > 1:  # only what may be linked to is remembered
                    self._linkable.add(parts)
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    proc_path = f"/proc/self/fd/{fd}"
                    for step, err in apply_metadata(proc_path, meta, self._owners):
                        self._record(parts, step, err)
                finally:
                    os.close(fd)
            return True
        except (OSError, RestoreError) as exc:
            self._record(path, f"creating {meta.type}", exc)
            return False

    def _create(self, dfd: int, name: bytes, make: Callable[[], _T]) -> _T:
        """Run ``make``; if the name exists and is not a directory, remove it and run it again."""
        try:
            return make()
        except FileExistsError:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise RestoreError(
                    f"creating {os.fsdecode(name)!r} - a directory of that name is in the way"
                ) from None
            os.unlink(name, dir_fd=dfd)
            return make()

    def _file_fd(self, handle: RestoreFile) -> int:
        """Return the open descriptor of ``handle``, reopening it if it was evicted.

        The caller holds ``handle._lock``.
        """
        with self._lock:
            if handle._fd < 0:
                dfd = self._dirs.get(handle._parts[:-1])
                fd = os.open(handle._parts[-1], _REOPEN_FILE, dir_fd=dfd)
                st = os.fstat(fd)
                if st.st_ino != handle._inode or not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise RestoreError(
                        f"reopening {handle.path!r} - it was replaced while being restored"
                    )
                handle._fd = fd
            self._open_files[handle] = None
            self._open_files.move_to_end(handle)
            self._evict(keep=handle)
            return handle._fd

    def _evict(self, keep: RestoreFile) -> None:
        """Close the least recently used idle files until at most ``max_open_files`` are open."""
        excess = len(self._open_files) - self._max_open
        if excess <= 0:
            return
        # Look at the oldest few only (some may be busy): O(excess), not O(open files).
        for other in list(itertools.islice(self._open_files, excess + 16)):
            if len(self._open_files) <= self._max_open:
                return
            if other is keep or not other._lock.acquire(blocking=False):
                continue  # in use by another thread; it will be evicted later
            try:
                self._close_file(other)
            finally:
                other._lock.release()

    def _close_file(self, handle: RestoreFile) -> None:
        if handle._fd >= 0:
            os.close(handle._fd)
            handle._fd = -1
        self._open_files.pop(handle, None)

    def _record(self, path: RelPath, action: str, exc: BaseException) -> None:
        where = display(path)
        error = exc if isinstance(exc, RestoreError) else _os_error(path, action, exc)
        if error is not exc:
            error.__cause__ = exc
        with self._lock:
            self.issues.append(RestoreIssue(where, error))


def _os_error(path: RelPath, action: str, exc: BaseException) -> RestoreError:
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return RestoreError(f"{action} {display(path)!r} in the restore target - {cause}")


def _nonzero_pieces(view: memoryview, offset: int) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(offset, piece)`` of ``view`` without its all-zero blocks (aligned 4 KiB
    blocks, and the unaligned ends).

    Only a block whose first 8 bytes are zero can be all zero: those are found at once
    (numpy, one strided look per block) and only they are compared in full. ~6 us per
    64 KiB chunk of a disk image, against ~30 us for a search of 4 KiB zero runs."""
    n = len(view)
    if n <= len(ZEROS) and ZEROS.startswith(view):
        return
    head = min(n, -offset % _HOLE_BLOCK_BYTES)
    tail = head + (n - head) // _HOLE_BLOCK_BYTES * _HOLE_BLOCK_BYTES
    holes: list[int] = []  # starts of the zero pieces: the head, whole blocks, the tail
    if head and ZEROS.startswith(view[:head]):
        holes.append(0)
    if tail > head:
        firsts = np.frombuffer(view[head:tail], dtype=np.uint64)[:: _HOLE_BLOCK_BYTES // 8]
        for number in np.flatnonzero(firsts == 0).tolist():
            start = head + number * _HOLE_BLOCK_BYTES
            if ZEROS.startswith(view[start : start + _HOLE_BLOCK_BYTES]):
                holes.append(start)
    if tail < n and ZEROS.startswith(view[tail:]):
        holes.append(tail)
    pos = 0
    for start in holes:
        if start > pos:
            yield offset + pos, view[pos:start]
        pos = head if start == 0 and head else min(n, start + _HOLE_BLOCK_BYTES)
    if pos < n:
        yield offset + pos, view[pos:]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
