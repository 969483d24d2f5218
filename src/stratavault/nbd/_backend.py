"""What an NBD server export serves: the ExportBackend protocol and a local file backend."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

from stratavault.nbd import _constants as c

_MAX_EXTENTS = 1024
_ZERO_PIECE = 4 * 1024 * 1024
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


@runtime_checkable
class ExportBackend(Protocol):
    """The disk behind one NBD export.

    The server checks ranges against ``size_bytes`` and never calls ``write``, ``trim`` or
    ``zero`` when ``read_only`` is true. A method may raise ``OSError`` (its errno is sent
    to the client) or a ``StratavaultError`` (sent as EIO); the connection stays up.
    Methods may be called from several threads at once (one per client).
    """

    @property
    def size_bytes(self) -> int:
        """The size of the disk in bytes."""
        ...

    @property
    def read_only(self) -> bool:
        """Refuse every change."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset``."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def trim(self, offset: int, length: int) -> None:
        """Forget the range (it may read back as anything; zeroes preferred)."""
        ...

    def zero(self, offset: int, length: int, *, no_hole: bool) -> None:
        """Make the range read as zeroes; ``no_hole`` keeps it allocated."""
        ...

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents ``(length, flags)`` from ``offset``: at least one, in
        order, covering at most ``length`` bytes (fewer is a partial answer). Flags: 1 hole,
        2 reads as zeroes."""
        ...


def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2) from the process's own symbols (``find_library`` would run
    ``ldconfig``), or ``None``."""
    func = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    func.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], func)


_FALLOCATE = _fallocate()


class FileBackend:
    """A local file (or block device) as an export; block status from SEEK_DATA/SEEK_HOLE."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = True) -> None:
        self.path = Path(path)
        self._read_only = read_only
        self._fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)

    @property
    def size_bytes(self) -> int:
        """The size of the file when it was opened."""
        return self._size

    @property
    def read_only(self) -> bool:
        """Opened read-only."""
        return self._read_only

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset``; past the end of a shrunk file, zeroes."""
        data = os.pread(self._fd, length, offset)
        while len(data) < length:
            more = os.pread(self._fd, length - len(data), offset + len(data))
            if not more:
                return data + bytes(length - len(data))
            data += more
        return data

    def write(self, offset: int, data: bytes) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def flush(self) -> None:
        """fsync the file."""
        os.fsync(self._fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        if _FALLOCATE is None:
            return False
        if _FALLOCATE(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return False
        raise OSError(err, f"fallocate on {self.path}: {os.strerror(err)}")

    def trim(self, offset: int, length: int) -> None:
        """Punch a hole (reads back as zeroes)."""
        self.zero(offset, length, no_hole=False)

    def zero(self, offset: int, length: int, *, no_hole: bool) -> None:
        """Punch a hole, or (``no_hole``) zero the range in place."""
        mode = _FALLOC_FL_ZERO_RANGE if no_hole else _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if self._fallocate(mode, offset, length):
            return
        end = offset + length
        while offset < end:
            n = min(_ZERO_PIECE, end - offset)
            self.write(offset, bytes(n))
            offset += n

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Data and hole extents of the file from SEEK_DATA/SEEK_HOLE."""
        end = min(offset + length, self._size)
        extents: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(extents) < _MAX_EXTENTS:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here
                    return [(end - offset, 0)] if end > offset else [(length, 0)]
                if exc.errno != errno.ENXIO:
                    raise
                data = end
            if data > pos:
                stop = min(data, end)
                extents.append((stop - pos, c.STATE_HOLE | c.STATE_ZERO))
                pos = stop
                continue
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            extents.append((hole - pos, 0))
            pos = hole
        return extents or [(length, 0)]
