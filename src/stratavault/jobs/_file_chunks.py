"""Reading one file into chunks in the repository (runs in a worker thread)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from stratavault.chunking import CdcChunker
from stratavault.jobs._progress import Cancellation
from stratavault.repo import Repository
from stratavault.snapshot import ContentRun
from stratavault.sources import FsEntry, SparseFileReader, prefetch_files
from stratavault.types import BlobKind

__all__ = ["FileChunkResult", "chunk_file", "chunk_files"]

_CHUNKER = CdcChunker()
_BUFFER_BYTES = 8 << 20
_local = threading.local()


def _buffer() -> bytearray:
    """The read buffer of this worker thread (one per thread, reused for every file)."""
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


def _store(
    repo: Repository, chunk: bytes | memoryview, level: int, result: FileChunkResult
) -> None:
    cid = repo.chunk_id(chunk)
    stored = repo.add_chunk(cid, chunk, BlobKind.DATA, level=level)
    result.chunks_added += stored > 0
    result.bytes_stored += stored
    result.content.append((cid, len(chunk)))


def chunk_file(
    repo: Repository,
    entry: FsEntry,
    *,
    level: int,
    cancel: Cancellation,
    on_bytes: Callable[[int], None],
) -> FileChunkResult:
    """Read ``entry`` (holes skipped), store its new chunks, return its content runs.

    ``OSError`` when the file cannot be opened or read.
    """
    result = FileChunkResult()
    with SparseFileReader(entry.path, buffer=_buffer()) as reader:
        result.size = reader.size
        whole = reader.read_whole(_CHUNKER.min_bytes)  # shorter than a chunk: one piece
        if whole is not None:
            if whole:
                _store(repo, whole, level, result)
                on_bytes(len(whole))
            result.bytes_read = len(whole)
            if len(whole) < reader.size:
                result.content.append((None, reader.size - len(whole)))
            result.changed = reader.changed()
            return result
        pos = 0
        for start, pieces in _Regions(reader.extents()):
            if start > pos:
                result.content.append((None, start - pos))
                pos = start
            for chunk in _CHUNKER.split(pieces):
                cancel.check()
                _store(repo, chunk, level, result)
                pos += len(chunk)
                on_bytes(len(chunk))
        result.bytes_read = pos - sum(n for cid, n in result.content if cid is None)
        if pos < reader.size:
            result.content.append((None, reader.size - pos))
        result.changed = reader.changed()
    return result


def chunk_files(
    repo: Repository,
    entries: list[FsEntry],
    *,
    level: int,
    cancel: Cancellation,
    on_bytes: Callable[[int], None],
) -> list[FileChunkResult | OSError]:
    """:func:`chunk_file` for several (small) files in one task; errors per file."""
    results: list[FileChunkResult | OSError] = []
    if len(entries) > 1:
        prefetch_files(e.path for e in entries)
    for entry in entries:
        cancel.check()
        try:
            results.append(chunk_file(repo, entry, level=level, cancel=cancel, on_bytes=on_bytes))
        except OSError as exc:
            results.append(exc)
    return results
