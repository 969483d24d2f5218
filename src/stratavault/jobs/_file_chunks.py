"""Reading files into chunks: in worker threads, or in worker processes for small files.

A file is read (holes skipped), cut into chunks, and each chunk goes to a *sink*.
In a thread, the sink stores the chunk in the repository directly. In a worker
process (small files, where per-file Python work would otherwise hold the GIL of
the main process), the sink hashes, compresses and encrypts the chunk and keeps
the sealed blob; the main process then adds the blobs it does not have yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stratavault._malloc import tune_malloc
from stratavault._process import die_with_parent
from stratavault.chunking import CdcChunker
from stratavault.errors import StorageError
from stratavault.jobs._progress import Cancellation
from stratavault.snapshot import ContentRun
from stratavault.sources import SparseFileReader, prefetch_files
from stratavault.types import BlobKind, ChunkId

if TYPE_CHECKING:  # worker processes need neither (numpy and the rest stay unloaded there)
    from stratavault.repo import ChunkSealer, Repository

__all__ = [
    "FileChunkResult",
    "chunk_file",
    "chunk_files",
    "init_seal_worker",
    "seal_files",
    "store_sealed",
]

_CHUNKER = CdcChunker()
_BUFFER_BYTES = 1 << 20
"""Read buffer per thread or worker process (files longer than a chunk stream through it).
Measured by hand, cold: the files bench's first backup peaked at 133-134 MiB with 1 MiB,
136-137 with 2 MiB and 144-149 with 4 MiB at the same speed, and a 2 GiB file took
9.5-11.2 s with 1 MiB against 10.3-11.1 s with 4 MiB (73 against 83 MiB); 8 MiB had been
slower (11.0-12.7 s)."""
_local = threading.local()

Sink = Callable[[bytes | memoryview], tuple[ChunkId, int]]
"""Takes a chunk, returns its id and the stored bytes it added."""


def _buffer() -> bytearray:
    """The read buffer of this thread (one per thread, reused for every file)."""
    buf: bytearray | None = getattr(_local, "buffer", None)
    if buf is None:
        buf = _local.buffer = bytearray(_BUFFER_BYTES)
    return buf


@dataclass(slots=True)
class FileChunkResult:
    """The content of one file as chunk runs, and what reading it cost."""

    content: list[ContentRun] = field(default_factory=list)
    size: int = 0
    bytes_read: int = 0
    chunks_added: int = 0
    bytes_stored: int = 0
    changed: bool = False
    sealed: list[tuple[ChunkId, int, bytes | bytearray]] = field(default_factory=list)
    """Chunks sealed in a worker process, ``(id, raw length, blob)``, not yet stored."""


class _Regions:
    """Splits ``(offset, data)`` pieces into runs of adjacent pieces (data regions)."""

    def __init__(self, pieces: Iterator[tuple[int, bytes | memoryview]]) -> None:
        self._pieces = pieces
        self._next = next(pieces, None)

    def __iter__(self) -> Iterator[tuple[int, Iterator[bytes | memoryview]]]:
        """Yield ``(start offset, pieces)`` per region; consume each region fully."""
        while self._next is not None:
            yield self._next[0], self._region()

    def _region(self) -> Iterator[bytes | memoryview]:
        while self._next is not None:
            offset, data = self._next
            yield data
            following = next(self._pieces, None)
            self._next = following
            if following is None or following[0] != offset + len(data):
                return


def _add(result: FileChunkResult, sink: Sink, chunk: bytes | memoryview) -> None:
    cid, stored = sink(chunk)
    result.chunks_added += stored > 0
    result.bytes_stored += stored
    result.content.append((cid, len(chunk)))


def chunk_file(
    path: str, sink: Sink, *, cancel: Cancellation, on_bytes: Callable[[int], None]
) -> FileChunkResult:
    """Read the file at ``path`` (holes skipped), pass its chunks to ``sink``.

    ``OSError`` when the file cannot be opened or read.
    """
    result = FileChunkResult()
    with SparseFileReader(path) as reader:
        result.size = reader.size
        whole = reader.read_whole(_CHUNKER.min_bytes)  # shorter than a chunk: one piece
        if whole is not None:
            if whole:
                _add(result, sink, whole)
                on_bytes(len(whole))
            pos = len(whole)
        else:
            reader.use_buffer(_buffer())  # allocated only by threads that read larger files
            pos = 0
            for start, pieces in _Regions(reader.extents()):
                if start > pos:
                    result.content.append((None, start - pos))
                    pos = start
                for chunk in _CHUNKER.split(pieces):
                    cancel.check()
                    _add(result, sink, chunk)
                    pos += len(chunk)
                    on_bytes(len(chunk))
        result.bytes_read = pos - sum(n for cid, n in result.content if cid is None)
        if pos < reader.size:
            result.content.append((None, reader.size - pos))
        result.changed = reader.changed()
    return result


def _results(
    paths: list[str], sink: Sink, cancel: Cancellation, on_bytes: Callable[[int], None]
) -> list[FileChunkResult | OSError]:
    results: list[FileChunkResult | OSError] = []
    if len(paths) > 1:
        prefetch_files(paths)
    for path in paths:
        cancel.check()
        try:
            results.append(chunk_file(path, sink, cancel=cancel, on_bytes=on_bytes))
        except StorageError:
            raise  # the repository failed (a full disk), not this file
        except OSError as exc:
            results.append(exc)
    return results


def chunk_files(
    repo: Repository,
    paths: list[str],
    *,
    level: int,
    cancel: Cancellation,
    on_bytes: Callable[[int], None],
) -> list[FileChunkResult | OSError]:
    """Read files in this process and store their new chunks; errors per file."""

    def store(chunk: bytes | memoryview) -> tuple[ChunkId, int]:
        cid = repo.chunk_id(chunk)
        return cid, repo.add_chunk(cid, chunk, BlobKind.DATA, level=level)

    return _results(paths, store, cancel, on_bytes)


# -- worker processes ---------------------------------------------------------------------

_worker: tuple[ChunkSealer, int] | None = None


def init_seal_worker(sealer: ChunkSealer, level: int) -> None:
    """Set up a worker process: Ctrl-C is the main process's to handle, and the worker
    dies with the main process (also when that one is killed with SIGKILL)."""
    global _worker
    die_with_parent()
    tune_malloc()
    _worker = (sealer, level)


def seal_files(paths: list[str]) -> list[FileChunkResult | OSError]:
    """In a worker process: read files and seal their chunks (see ``store_sealed``)."""
    assert _worker is not None, "init_seal_worker was not called"
    sealer, level = _worker
    sealed: list[tuple[ChunkId, int, bytes | bytearray]] = []
    seen: set[ChunkId] = set()

    def seal(chunk: bytes | memoryview) -> tuple[ChunkId, int]:
        cid = sealer.chunk_id(chunk)
        if cid not in seen:
            seen.add(cid)
            sealed.append((cid, len(chunk), sealer.seal(cid, chunk, BlobKind.DATA, level)))
        return cid, 0

    results = _results(paths, seal, Cancellation(), lambda _n: None)
    for result in results:
        if isinstance(result, FileChunkResult):
            ids = {cid for cid, _ in result.content if cid is not None}
            result.sealed = [s for s in sealed if s[0] in ids]
            sealed = [s for s in sealed if s[0] not in ids]
    return results


def store_sealed(repo: Repository, result: FileChunkResult) -> int:
    """Add the blobs a worker process sealed for one file; return the bytes read."""
    for cid, raw_len, blob in result.sealed:
        stored = repo.add_sealed(cid, blob, raw_len)
        result.chunks_added += stored > 0
        result.bytes_stored += stored
    result.sealed = []
    return result.bytes_read
