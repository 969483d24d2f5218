"""Who writes the regular files of a restore: worker processes, or the restoring process.

Creating files and writing small ones is kernel and interpreter work in many
short steps. Threads of one Python process take turns on the interpreter lock
at every step, so adding threads adds lock traffic, not speed; a restore
spreads its batches of files over worker processes instead. The workers are
forked from the restoring process before it starts any thread of its own, and
inherit its open repository. A storage that cannot be used after a fork (a
pool of network connections, a per-process rate limit) keeps the work in the
restoring process (:class:`InlineWriters`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from stratavault._process import die_with_parent, shared_heap
from stratavault.errors import RestoreError
from stratavault.jobs._progress import Cancellation
from stratavault.jobs._restore_writer import BatchResult, FileWriter, PlannedBatch, WriterOptions
from stratavault.repo import Repository

__all__ = ["InlineWriters", "ProcessWriters", "Writers", "start_writers"]

_WAIT_S = 0.25
"""How long a wait for workers lasts before it looks at the cancellation flag again."""


class Writers(Protocol):
    """Takes batches of files to restore and reports what was done."""

    def submit(self, batch: PlannedBatch) -> None:
        """Restore ``batch``; may wait while earlier batches are still being written."""

    def poll(self) -> BatchResult:
        """Results of batches finished since the last call (does not wait); batches are
        numbered in the order submitted, from 0."""

    def progress(self) -> tuple[int, int]:
        """Bytes written and files finished so far, batches in flight included."""

    def finish(self) -> BatchResult:
        """Wait for every batch, close, and return the results not yet polled."""

    def abort(self) -> None:
        """Stop at once (Ctrl-C or a failure); files in flight stay incomplete."""


def start_writers(
    repo: Repository, options: WriterOptions, cancel: Cancellation, processes: int
) -> Writers:
    """Worker processes if ``processes`` > 1 and the repository's storage can be
    used from a forked child, else the restoring process itself."""
    if processes > 1 and repo.storage.properties.fork_safe and hasattr(os, "fork"):
        return ProcessWriters(repo, options, cancel, processes)
    threads = max(options.threads, os.cpu_count() or 1)
    return InlineWriters(repo, dataclasses.replace(options, threads=threads), cancel)


class InlineWriters:
    """Writes each batch in the restoring process, with its own threads, when submitted."""

    def __init__(self, repo: Repository, options: WriterOptions, cancel: Cancellation) -> None:
        self._lock = threading.Lock()
        self._counts = [0, 0]
        self._writer = FileWriter(repo, options, cancel, self._count)
        self._done = BatchResult()
        self._submitted = 0

    def _count(self, nbytes: int, files: int) -> None:
        with self._lock:
            self._counts[0] += nbytes
            self._counts[1] += files

    def submit(self, batch: PlannedBatch) -> None:
        """Restore ``batch`` now."""
        self._done.add(self._writer.write(batch))
        self._done.batches.append(self._submitted)
        self._submitted += 1

    def poll(self) -> BatchResult:
        """Results since the last call."""
        done, self._done = self._done, BatchResult()
        return done

    def progress(self) -> tuple[int, int]:
        """Bytes written and files finished so far."""
        with self._lock:
            return self._counts[0], self._counts[1]

    def finish(self) -> BatchResult:
        """Close the writer; return the results not yet polled."""
        done = self.poll()
        done.add(self._writer.close())
        return done

    def abort(self) -> None:
        """Close the writer (files in flight are recorded as unfinished)."""
        self._writer.close()


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    conn: Connection
    outstanding: deque[int] = field(default_factory=deque)
    """Numbers of the batches sent and not yet reported done, oldest first."""
    open: bool = True
    """False once the worker reported its closing result."""


class ProcessWriters:
    """Writes batches in ``count`` forked worker processes, at most ``in_flight`` each.

    Create it before the restoring process starts threads (a fork copies only
    the calling thread; locks held by others would stay locked in the child).
    """

    def __init__(
        self,
        repo: Repository,
        options: WriterOptions,
        cancel: Cancellation,
        count: int,
        in_flight: int = 2,
    ) -> None:
        self._cancel, self._in_flight = cancel, in_flight
        self._done = BatchResult()
        self._submitted = 0
        self._workers: list[_Worker] = []
        with shared_heap() as context:
            self._counters: Any = context.RawArray("q", 2 * count)
            try:
                for slot in range(count):
                    here, there = context.Pipe()
                    process = context.Process(
                        target=_worker_main,
                        args=(there, repo, options, self._counters, slot),
                        name=f"stratavault-restore-{slot}",
                        daemon=True,
                    )
                    process.start()
                    there.close()
                    self._workers.append(_Worker(process, here))
            except BaseException:
                self.abort()
                raise

    def submit(self, batch: PlannedBatch) -> None:
        """Send ``batch`` to the least busy worker, waiting while all are full."""
        worker = min(self._workers, key=lambda w: len(w.outstanding))
        while len(worker.outstanding) >= self._in_flight:
            self._wait()
            worker = min(self._workers, key=lambda w: len(w.outstanding))
        worker.conn.send(list(batch))
        worker.outstanding.append(self._submitted)
        self._submitted += 1

    def poll(self) -> BatchResult:
        """Results that arrived since the last call."""
        self._wait(timeout=0)
        done, self._done = self._done, BatchResult()
        return done

    def progress(self) -> tuple[int, int]:
        """Bytes written and files finished by all workers so far."""
        counts = self._counters[:]
        return sum(counts[0::2]), sum(counts[1::2])

    def finish(self) -> BatchResult:
        """Tell every worker to close, wait for their last results, and reap them."""
        for worker in self._workers:
            worker.conn.send(None)
        while any(w.open for w in self._workers):
            self._wait()
        for worker in self._workers:
            worker.process.join()
            worker.conn.close()
        done, self._done = self._done, BatchResult()
        return done

    def abort(self) -> None:
        """Kill the workers."""
        for worker in self._workers:
            worker.process.kill()
        for worker in self._workers:
            worker.process.join()
            worker.conn.close()
        self._workers = []

    def _wait(self, timeout: float = _WAIT_S) -> None:
        """Take the messages of the workers that have one, waiting up to ``timeout``."""
        self._cancel.check()
        by_conn = {w.conn: w for w in self._workers if w.open}
        for conn in multiprocessing.connection.wait(list(by_conn), timeout):
            self._receive(by_conn[conn])  # type: ignore[index]

    def _receive(self, worker: _Worker) -> None:
        try:
            kind, value = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(5)
            raise RestoreError(
                f"restore worker process {worker.process.pid} ended unexpectedly "
                f"(exit code {worker.process.exitcode}); the restore is incomplete"
            ) from None
        if kind == "failed":
            raise value
        self._done.add(value)
        if kind == "done":  # a worker writes its batches in the order it got them
            self._done.batches.append(worker.outstanding.popleft())
        else:
            worker.open = False


def _worker_main(
    conn: Connection, repo: Repository, options: WriterOptions, counters: Any, slot: int
) -> None:
    """A worker process: restore the batches that arrive until ``None``, then close."""
    die_with_parent()
    lock = threading.Lock()

    def count(nbytes: int, files: int) -> None:
        with lock:
            counters[2 * slot] += nbytes
            counters[2 * slot + 1] += files

    inbox: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
    threading.Thread(target=_receive_batches, args=(conn, inbox), daemon=True).start()
    try:
        writer = FileWriter(repo, options, Cancellation(), count)
        while (batch := inbox.get()) is not None:
            conn.send(("done", writer.write(batch)))
        conn.send(("closed", writer.close()))
    except BaseException as exc:  # reported to the restoring process, which raises it
        conn.send(("failed", _transferable(exc)))


def _receive_batches(conn: Connection, inbox: queue.SimpleQueue[list[Any] | None]) -> None:
    """Read batches as soon as they are sent, so the sender never waits on a full pipe."""
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            batch = None
        inbox.put(batch)
        if batch is None:
            return


def _transferable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a ``RestoreError`` with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RestoreError(f"restore worker process {os.getpid()} failed - {exc!r}")
    return exc
