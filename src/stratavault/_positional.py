"""A read-only, seekable file over anything that can read at an offset."""

from __future__ import annotations

import io
import threading
from typing import Any

__all__ = ["PositionalReader"]


class PositionalReader(io.RawIOBase):
    """The file protocol (``read``/``readinto``/``seek``/``tell``) over :meth:`read_at`.

    Subclasses provide ``size`` and ``read_at(offset, length)`` (position-free, so one
    object can also be read at offsets from several threads); the position is kept here,
    under a lock. Seeking past the end is allowed; reads there return ``b""``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0
        self._pos_lock = threading.Lock()

    @property
    def size(self) -> int:
        """Size in bytes."""
        raise NotImplementedError

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end)."""
        raise NotImplementedError

    def readable(self) -> bool:
        """Always true."""
        return True

    def seekable(self) -> bool:
        """Always true."""
        return True

    def tell(self) -> int:
        """The current position."""
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position."""
        with self._pos_lock:
            base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
            if base is None:
                raise ValueError(f"bad whence {whence}")
            if base + offset < 0:
                raise ValueError(f"seek to negative offset {base + offset}")
            self._pos = base + offset
            return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the position (all the rest when ``size`` < 0)."""
        with self._pos_lock:
            left = max(0, self.size - self._pos)
            want = left if size is None or size < 0 else min(size, left)
            data = self.read_at(self._pos, want) if want else b""
            self._pos += len(data)
            return data

    def readall(self) -> bytes:
        """Everything from the position to the end."""
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the position; the number of bytes read."""
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)
