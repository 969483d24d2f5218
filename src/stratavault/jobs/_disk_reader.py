"""A random-access, read-only file view of one disk of a snapshot, straight out of the repository.

:class:`DiskReader` is what file-level restore hands to the filesystem readers and what an
NBD export serves: ``read``/``readinto``/``seek``/``tell`` like a file opened ``rb``, plus
position-free ``read_at``/``readinto_at`` for concurrent clients. Chunks come out of the
repository through a bounded LRU cache (keyed by chunk id, so a chunk the disk holds twice
is read once); zero chunks are never read nor cached. When reads run sequentially (a read
starts where an earlier one ended), the next chunks are fetched ahead in a thread pool. Two
readers that want the same missing chunk wait for one fetch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from stratavault._loading_cache import LoadingCache
from stratavault._positional import PositionalReader
from stratavault.errors import IntegrityError
from stratavault.jobs._restore_disk import select_disk
from stratavault.repo import Repository
from stratavault.snapshot import DiskIndex, Snapshot, load_disk_index
from stratavault.types import ChunkId

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["DEFAULT_CACHE_BYTES", "DEFAULT_READAHEAD_BYTES", "DiskReader", "open_disk_reader"]

DEFAULT_CACHE_BYTES = 64 << 20
"""Plaintext bytes of chunks kept in memory by one reader (at least a few chunks)."""
DEFAULT_READAHEAD_BYTES = 16 << 20
"""Bytes fetched ahead of a sequential reader (at least one chunk)."""
_STREAMS = 16
"""Recent read ends remembered to recognise sequential readers among concurrent ones."""


class DiskReader(PositionalReader):
    """One disk of a snapshot as a seekable, read-only binary file; thread-safe.

    ``read``/``seek``/``tell`` share one position (serialised by a lock); ``read_at`` and
    ``readinto_at`` take an offset and may run in any number of threads at once. Reads past
    the end return fewer bytes (``b""`` at the end). Damaged or missing chunks raise the
    repository's ``DataDamagedError`` naming the chunk, when (and only when) they are read.
    """

    def __init__(
        self,
        repo: Repository,
        index: DiskIndex,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
        workers: int = 0,
    ) -> None:
        super().__init__()
        self.repo, self.index = repo, index
        self.name = index.name
        self.chunk_bytes = index.chunk_bytes
        self._size = index.size_bytes
        self._mask = index.data_mask()
        capacity = max(cache_bytes // self.chunk_bytes, 2)
        ahead = max(readahead_bytes // self.chunk_bytes, 1)
        self._ahead = min(ahead, max(capacity // 2, 1))
        self._lock = threading.Lock()
        self._cache: LoadingCache[bytes, bytes] = LoadingCache(capacity)
        self._ends: deque[int] = deque(maxlen=_STREAMS)
        self._windows: deque[tuple[int, int]] = deque(maxlen=_STREAMS)
        """``(first, end)`` chunk numbers each recent stream's read-ahead asked for."""
        self._zeros = b""
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers or max(2, os.cpu_count() or 1)
        self.chunks_fetched = 0
        """Chunks read from the repository so far (cache misses and read-ahead)."""

    # --- file protocol -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Size of the disk in bytes."""
        return self._size

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fill ``buffer`` from the position; the number of bytes read."""
        with self._pos_lock:
            n = self.readinto_at(self._pos, buffer)
            self._pos += n
            return n

    def close(self) -> None:
        """Stop read-ahead and drop the cache; the repository stays open."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._cache.close(self._closed_error())  # wakes the waiters of cancelled read-ahead
        super().close()

    # --- position-free reads -------------------------------------------------------------------

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer at the end of the disk)."""
        if self.closed:
            raise ValueError(f"disk {self.name}: read of a closed reader")
        size = max(0, min(size, self._size - offset))
        if size == 0:
            return b""
        first = offset // self.chunk_bytes
        if (offset + size - 1) // self.chunk_bytes == first:  # one chunk: slice, one copy
            self._start_read_ahead(offset, size)
            data = self._chunk_data(first)
            start = offset - first * self.chunk_bytes
            return bytes(data[start : start + size])
        buffer = bytearray(size)
        self.readinto_at(offset, buffer)
        return bytes(buffer)

    def readinto_at(self, offset: int, buffer: WriteableBuffer) -> int:
        """Fill ``buffer`` with the bytes at ``offset``; the number of bytes (short at the end)."""
        if self.closed:
            raise ValueError(f"disk {self.name}: read of a closed reader")
        view = memoryview(buffer).cast("B")
        size = max(0, min(len(view), self._size - offset))
        if size:
            self._start_read_ahead(offset, size)
        done = 0
        while done < size:
            pos = offset + done
            number, start = divmod(pos, self.chunk_bytes)
            n = min(self.chunk_bytes - start, size - done)
            if self._mask[number]:
                data = self._chunk_data(number)
                view[done : done + n] = data[start : start + n]
            else:
                view[done : done + n] = self._zero_bytes()[:n]
            done += n
        if size:
            self._note_read(offset, size)
        return size

    # --- chunks --------------------------------------------------------------------------------

    def _closed_error(self) -> ValueError:
        return ValueError(f"disk {self.name}: reader closed")

    def _zero_bytes(self) -> bytes:
        if not self._zeros:
            self._zeros = bytes(self.chunk_bytes)
        return self._zeros

    def _start_read_ahead(self, offset: int, size: int) -> None:
        """Fetch the chunks after a read of ``size`` bytes at ``offset`` if it continues an
        earlier one."""
        if self._sequential(offset):
            self._read_ahead((offset + size - 1) // self.chunk_bytes + 1)

    def _chunk_data(self, number: int) -> bytes:
        """The plaintext of chunk ``number`` (zeros for a zero chunk)."""
        if not self._mask[number]:
            start, end = self.index.chunk_range(number)
            return self._zero_bytes()[: end - start]
        return self._load(number)

    def _load(self, number: int) -> bytes:
        cid = self.index.ids[number].tobytes()
        return self._cache.get_or_load(cid, lambda: self._fetch(number, cid))

    def _fetch(self, number: int, cid: bytes) -> bytes:
        """Read chunk ``number`` from the repository; the other members of its frame go
        into the cache too (the one asked for is cached last, so evicted last)."""
        chunks = self.repo.read_chunk_and_mates(ChunkId(cid))
        data = chunks[ChunkId(cid)]
        start, end = self.index.chunk_range(number)
        if len(data) != end - start:
            raise IntegrityError(
                f"reading chunk {number} ({cid.hex()[:16]}) of disk {self.name} - "
                f"{len(data)} bytes, the disk index says {end - start}"
            )
        with self._lock:
            self.chunks_fetched += 1
        for mate, mate_data in chunks.items():
            if mate != cid and len(mate_data) == self.chunk_bytes:  # a short one: fetched
                self._cache.put(mate, mate_data)
        return data

    def _sequential(self, offset: int) -> bool:
        with self._lock:
            return offset in self._ends or offset == 0

    def _note_read(self, offset: int, size: int) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._ends.remove(offset)
            self._ends.append(offset + size)

    def _read_ahead(self, first: int) -> None:
        """Start fetching the data chunks ``first`` .. ``first + ahead`` not cached yet;
        those a stream's earlier read-ahead already asked for are not looked at again (a
        sequential read of 64 KiB chunks would otherwise look at 256 per chunk read)."""
        last = min(first + self._ahead, self.index.chunk_count)
        todo: list[tuple[int, bytes, Future[bytes]]] = []
        with self._lock:
            begin = first
            for window in self._windows:
                if window[0] <= first <= window[1]:
                    begin = max(first, window[1])
                    self._windows.remove(window)
                    break
            self._windows.append((first, last))
            for number in range(begin, last):
                if not self._mask[number]:
                    continue
                cid = self.index.ids[number].tobytes()
                future = self._cache.reserve(cid)
                if future is not None:
                    todo.append((number, cid, future))
            if todo and self._pool is None and not self.closed:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="disk-read")
            pool = self._pool
        for number, cid, future in todo:
            fetch = functools.partial(self._fetch, number, cid)
            try:
                if pool is not None:
                    pool.submit(self._cache.load, cid, future, fetch)
                    continue
            except RuntimeError:  # shut down meanwhile
                pass
            self._cache.abandon(cid, future, self._closed_error())


def open_disk_reader(
    repo: Repository,
    snapshot: Snapshot,
    disk: str | None = None,
    *,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
) -> DiskReader:
    """A :class:`DiskReader` of disk ``disk`` of ``snapshot`` (its only disk when ``None``)."""
    ref = select_disk(snapshot, disk)
    index = load_disk_index(repo, ref)
    return DiskReader(repo, index, cache_bytes=cache_bytes, readahead_bytes=readahead_bytes)
