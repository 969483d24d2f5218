"""Reading a regular file's content: data regions only, holes skipped, changes detected."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from stratavault.sources._entry import FileStamp

__all__ = [
    "DEFAULT_READ_BUFFER_BYTES",
    "FileChangedError",
    "SparseFileReader",
    "prefetch_files",
    "read_file_extents",
]

DEFAULT_READ_BUFFER_BYTES = 8 << 20

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NO_SEEK_DATA = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


class FileChangedError(Exception):
    """A file changed while it was read, so what was read may be inconsistent.

    Not an ``OSError``: the file was readable, the caller decides whether to
    keep the content (marked as possibly inconsistent) or to read again.
    """

    def __init__(self, path: Path | str, before: FileStamp, after: FileStamp) -> None:
        self.path = path
        self.before = before
        self.after = after
        super().__init__(
            f"reading file {path} - it changed while being read "
            f"(size {before.size} -> {after.size}, mtime_ns {before.mtime_ns} -> {after.mtime_ns})"
        )


class SparseFileReader:
    """Reads the data regions of one regular file; holes are skipped.

    Use as a context manager. The file is opened without following a symbolic
    link and without blocking (a FIFO swapped in after the walk cannot hang the
    backup); anything but a regular file is refused with ``OSError``. Call
    :meth:`extents` once, then :meth:`changed` or :meth:`check_unchanged`.

    Memory: with ``buffer`` given, data is read into it (pieces of at most its
    length) and each yielded ``memoryview`` is only valid until the next one is
    asked for; a worker thread passes the same buffer for every file it reads.
    Otherwise, with ``reuse_buffer=False`` every piece is a fresh ``bytes`` of at
    most ``buffer_bytes`` that the caller may keep; with ``reuse_buffer=True``
    one ``bytearray`` of ``buffer_bytes`` is read into over and over, and each
    yielded ``memoryview`` is only valid until the next one is asked for.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        buffer_bytes: int = DEFAULT_READ_BUFFER_BYTES,
        reuse_buffer: bool = False,
        buffer: bytearray | None = None,
    ) -> None:
        self.path = path
        self._fd = _open_regular(path)
        st = os.fstat(self._fd)
        if buffer is None and reuse_buffer:
            buffer = bytearray(max(1, min(buffer_bytes, st.st_size)))
        self._buffer = buffer
        self._buffer_bytes = len(buffer) if buffer is not None else buffer_bytes
        self._dense = st.st_blocks * 512 >= st.st_size
        """Every byte has a block: no holes, so no need to ask for data regions."""
        self.stamp_at_open: FileStamp = FileStamp.from_stat(st)
        """Size, times and inode when opened; compare with the walk's to spot a swap."""
        self.data_ranges: list[tuple[int, int]] = []
        """``(offset, length)`` of every data region read so far."""
        self._truncated = False

    @property
    def size(self) -> int:
        """The file's size when it was opened; :meth:`extents` reads up to here."""
        return self.stamp_at_open.size

    def __enter__(self) -> SparseFileReader:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def use_buffer(self, buffer: bytearray) -> None:
        """Read :meth:`extents` into ``buffer`` from now on (see the class docstring)."""
        self._buffer = buffer
        self._buffer_bytes = len(buffer)

    def read_whole(self, max_bytes: int) -> bytes | None:
        """The whole file in one read when it has no holes and at most ``max_bytes``.

        ``None`` otherwise: then use :meth:`extents`. Small files are most files,
        and this path costs one ``pread`` and no generators.
        """
        if not self._dense or self.size > max_bytes:
            return None
        data = os.pread(self._fd, self.size, 0) if self.size else b""
        if len(data) < self.size:
            self._truncated = True
        if data:
            self._note_range(0, len(data))
        return data

    def extents(self) -> Iterator[tuple[int, bytes | memoryview]]:
        """Yield ``(offset, data)`` for the file's data, in order, skipping holes.

        Pieces are at most ``buffer_bytes`` long; consecutive pieces of one data
        region are adjacent. A file that shrinks while read ends early (then
        :meth:`changed` is true).
        """
        for start, end in self._data_regions():
            offset = start
            while offset < end:
                data = self._read(offset, min(self._buffer_bytes, end - offset))
                if not data:
                    self._truncated = True
                    return
                self._note_range(offset, len(data))
                yield offset, data
                offset += len(data)

    def holes(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of the holes between the data read, up to :attr:`size`."""
        holes, pos = [], 0
        for offset, length in self.data_ranges:
            if offset > pos:
                holes.append((pos, offset - pos))
            pos = offset + length
        if pos < self.size and not self._truncated:
            holes.append((pos, self.size - pos))
        return holes

    def changed(self) -> bool:
        """Tell whether size, mtime or ctime differ from when the file was opened."""
        now = FileStamp.from_stat(os.fstat(self._fd))
        return self._truncated or not _same_content_stamp(self.stamp_at_open, now)

    def check_unchanged(self) -> None:
        """Raise :class:`FileChangedError` if the file changed since it was opened."""
        now = FileStamp.from_stat(os.fstat(self._fd))
        if self._truncated or not _same_content_stamp(self.stamp_at_open, now):
            raise FileChangedError(self.path, self.stamp_at_open, now)

    def _data_regions(self) -> Iterator[tuple[int, int]]:
        """Yield ``[start, end)`` of the data regions below the size at open."""
        pos, size = 0, self.size
        if self._dense:
            if size:
                yield 0, size
            return
        while pos < size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
                end = os.lseek(self._fd, start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                    return
                if exc.errno not in _NO_SEEK_DATA:
                    raise
                start, end = pos, size
            if start >= size:
                return
            yield start, min(end, size)
            pos = end

    def _read(self, offset: int, length: int) -> bytes | memoryview:
        if self._buffer is None:
            return os.pread(self._fd, length, offset)
        view = memoryview(self._buffer)[:length]
        return view[: os.preadv(self._fd, [view], offset)]

    def _note_range(self, offset: int, length: int) -> None:
        if self.data_ranges:
            last_offset, last_length = self.data_ranges[-1]
            if last_offset + last_length == offset:
                self.data_ranges[-1] = (last_offset, last_length + length)
                return
        self.data_ranges.append((offset, length))


def read_file_extents(
    path: Path, *, buffer_bytes: int = DEFAULT_READ_BUFFER_BYTES
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, data)`` of a regular file's data regions (fresh ``bytes``).

    After the last piece, raise :class:`FileChangedError` if the file changed
    while it was read. ``OSError`` if it cannot be opened or read.
    """
    with SparseFileReader(path, buffer_bytes=buffer_bytes) as reader:
        for offset, data in reader.extents():
            yield offset, bytes(data)
        reader.check_unchanged()


def prefetch_files(paths: Iterable[Path | str]) -> None:
    """Ask the kernel to start reading these files now (``POSIX_FADV_WILLNEED``).

    With a cold page cache the reads then overlap instead of waiting one file at
    a time. Errors are ignored: reading the file later reports them.
    """
    for path in paths:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _open_regular(path: Path | str) -> int:
    """Open ``path`` for reading without following a symlink; refuse non-regular files."""
    try:
        fd = os.open(path, _OPEN_FLAGS | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
        fd = os.open(path, _OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file any more", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_content_stamp(before: FileStamp, after: FileStamp) -> bool:
    return (before.size, before.mtime_ns, before.ctime_ns) == (
        after.size,
        after.mtime_ns,
        after.ctime_ns,
    )
