"""Chunkers: content-defined (FastCDC) for files, fixed-size for disks.

Both work on a stream of buffers of any size and yield ``memoryview`` slices of
those buffers (no copies); a chunk that spans two buffers is joined once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pyfastcdc import FastCDC

__all__ = ["DEFAULT_CDC_AVG_BYTES", "CdcChunker", "FixedChunker"]

DEFAULT_CDC_AVG_BYTES = 1 << 20


class CdcChunker:
    """Content-defined chunking with FastCDC (min avg/4, max avg*4).

    An insertion early in a file moves only the chunk boundaries next to it, so
    the rest of the file deduplicates against the previous version.
    """

    def __init__(self, avg_bytes: int = DEFAULT_CDC_AVG_BYTES) -> None:
        self._cdc = FastCDC(avg_size=avg_bytes)
        self.min_bytes: int = self._cdc.min_size
        """Streams up to this size are always one chunk."""
        self.max_bytes: int = self._cdc.max_size

    def split(self, buffers: Iterable[bytes | bytearray | memoryview]) -> Iterator[memoryview]:
        """Yield the chunks of the stream formed by concatenating ``buffers``.

        A buffer may be reused by the caller after the chunks cut from it were consumed.
        """
        carry = b""
        for buf in buffers:
            data: bytes | bytearray | memoryview = carry + bytes(buf) if carry else buf
            carry = b""
            view = memoryview(data)
            for chunk in self._cdc.cut_buf(data):
                end = chunk.offset + chunk.length
                if end == len(view) and chunk.length < self.max_bytes:
                    # The last cut of a buffer is arbitrary: keep it for the next buffer.
                    carry = bytes(view[chunk.offset :])
                    break
                yield view[chunk.offset : end]
        if carry:
            yield from self._final(carry)

    def _final(self, carry: bytes) -> Iterator[memoryview]:
        view = memoryview(carry)
        for chunk in self._cdc.cut_buf(carry):
            yield view[chunk.offset : chunk.offset + chunk.length]


class FixedChunker:
    """Fixed-size chunks, as used for disks (aligned to the bitmap granularity)."""

    def __init__(self, size_bytes: int) -> None:
        if size_bytes <= 0:
            raise ValueError("chunk size must be positive")
        self.size_bytes = size_bytes

    def split(self, buffers: Iterable[bytes | bytearray | memoryview]) -> Iterator[memoryview]:
        """Yield ``size_bytes`` slices of the concatenated stream (the last may be shorter)."""
        pending = bytearray()
        for buf in buffers:
            view = memoryview(buf)
            if pending:
                take = min(self.size_bytes - len(pending), len(view))
                pending += view[:take]
                view = view[take:]
                if len(pending) < self.size_bytes:
                    continue
                yield memoryview(bytes(pending))
                pending.clear()
            whole = len(view) - len(view) % self.size_bytes
            for off in range(0, whole, self.size_bytes):
                yield view[off : off + self.size_bytes]
            pending += view[whole:]
        if pending:
            yield memoryview(bytes(pending))
