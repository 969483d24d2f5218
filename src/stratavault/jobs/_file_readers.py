"""Where a backup's files are read: worker processes for batches of small files, threads of
this process for large files (streamed with bounded memory).

Small files are most files; reading, chunking, hashing, compressing and encrypting them in
Python holds the GIL per file, so they go to worker processes (one per core), which hand back
sealed blobs that this process adds to the repository. They are forked when the backup has
sent ``processes_after_files`` small files to be read; where processes cannot run at all,
threads do all the work.

A worker forked late keeps what this process held at that moment (pack buffers, read buffers,
heap pages) for as long as this process goes on rewriting it: forked at the first batch of
the bench's first backup, before anything was stored, the two workers peak at ~23 MiB PSS
each instead of ~38. A backup that reads few files is better off without them (see
``BackupFilesOptions.processes_after_files``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from stratavault._process import shared_heap
from stratavault.jobs._file_chunks import (
    FileChunkResult,
    chunk_files,
    init_seal_worker,
    seal_files,
    store_sealed,
)
from stratavault.jobs._progress import Cancellation
from stratavault.repo import Repository
from stratavault.sources import FsEntry

__all__ = ["Batch", "FileReaders", "FileResults"]

FileResults = list[FileChunkResult | OSError]
"""One result per file of a batch, in order: its chunks, or why it could not be read."""


@dataclass(slots=True)
class Batch:
    """Files read together by one task (many small files cost one task)."""

    future: Future[FileResults] = field(default_factory=Future)
    entries: list[FsEntry] = field(default_factory=list)
    size_bytes: int = 0
    in_process: bool = False
    """Read in a thread of this process (a large file) rather than in a worker process."""


def _chain(source: Future[FileResults], target: Future[FileResults]) -> None:
    """Pass the outcome of a worker's future on to the batch's future."""
    if source.cancelled():
        target.cancel()
        target.set_running_or_notify_cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


class FileReaders:
    """Runs batches of files; ``batch.future`` gets the results once they are stored."""

    def __init__(
        self,
        repo: Repository,
        *,
        level: int,
        workers: int,
        max_pending: int,
        processes_after_files: int,
        cancel: Cancellation,
        on_bytes: Callable[[int], None],
    ) -> None:
        self._repo, self._level, self._workers = repo, level, workers
        self._processes_after = processes_after_files
        self._cancel, self._on_bytes = cancel, on_bytes
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="backup")
        self._processes: ProcessPoolExecutor | None = None
        self._processes_failed = False
        self._small_files_sent = 0
        self._slots = threading.BoundedSemaphore(max_pending)

    def submit(self, batch: Batch) -> None:
        """Start a batch; blocks while too many batches are queued (bounded memory)."""
        self._slots.acquire()
        paths = [e.path for e in batch.entries]
        work: Future[FileResults] | None = None
        self._small_files_sent += 0 if batch.in_process else len(paths)
        worth = self._small_files_sent > self._processes_after
        if not batch.in_process and worth and not self._processes_failed:
            try:
                work = self._submit_to_processes(paths)
            except (BrokenProcessPool, OSError):
                self._processes_failed = True
            else:
                work.add_done_callback(lambda f: self._absorb(f, batch, paths))
        if work is None:
            work = self._threads.submit(self._read, paths)
            work.add_done_callback(lambda f: _chain(f, batch.future))
        work.add_done_callback(lambda _f: self._slots.release())

    def shutdown(self, *, cancel: bool) -> None:
        """Stop the workers: wait for running tasks, drop queued ones when cancelling."""
        self._threads.shutdown(wait=True, cancel_futures=cancel)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=cancel)

    def _submit_to_processes(self, paths: list[str]) -> Future[FileResults]:
        if self._processes is not None:
            return self._processes.submit(seal_files, paths)
        with shared_heap() as context:  # the pool forks all its workers at the first submit
            self._processes = ProcessPoolExecutor(
                self._workers,
                mp_context=context,
                initializer=init_seal_worker,
                initargs=(self._repo.sealer(), self._level),
            )
            return self._processes.submit(seal_files, paths)

    def _read(self, paths: list[str]) -> FileResults:
        self._cancel.check()
        return chunk_files(
            self._repo, paths, level=self._level, cancel=self._cancel, on_bytes=self._on_bytes
        )

    def _absorb(self, work: Future[FileResults], batch: Batch, paths: list[str]) -> None:
        """Store what a worker process sealed, then release the batch's files.

        If worker processes cannot run here (they failed to start or died), the batch
        and all later ones are read in threads of this process instead.
        """
        if work.cancelled():  # Ctrl-C dropped it from the queue
            _chain(work, batch.future)
            return
        if isinstance(work.exception(), (BrokenProcessPool, OSError)):
            self._processes_failed = True
            redo = self._threads.submit(self._read, paths)
            redo.add_done_callback(lambda f: _chain(f, batch.future))
            return
        try:
            results = work.result()
            for result in results:
                if isinstance(result, FileChunkResult):
                    self._on_bytes(store_sealed(self._repo, result))
        except BaseException as exc:
            batch.future.set_exception(exc)
            return
        batch.future.set_result(results)
