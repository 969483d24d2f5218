"""A small pool of threads that seal and upload full packs, with a bounded queue."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from contextlib import suppress

from stratavault.errors import ObjectExistsError
from stratavault.repo._crypto import MasterKeys
from stratavault.repo._packs import OpenPack, SealedPack, seal_pack
from stratavault.storage import Storage

__all__ = ["Uploader"]

_STOP = None


class Uploader:
    """Seals packs (join, header, hash) and puts them, ``threads`` at a time.

    ``submit`` blocks while ``queue_size`` packs wait (backpressure). ``on_done`` is
    called in the uploader thread after a successful put, ``on_error`` after a
    failed one; a failed pack is never passed to ``on_done``. The pack's file is removed
    after either.
    """

    def __init__(
        self,
        storage: Storage,
        keys: MasterKeys,
        on_done: Callable[[SealedPack], None],
        on_error: Callable[[OpenPack, BaseException], None],
        *,
        threads: int = 2,
        queue_size: int = 2,
    ) -> None:
        self._storage = storage
        self._keys = keys
        self._on_done = on_done
        self._on_error = on_error
        self._queue: queue.Queue[OpenPack | None] = queue.Queue(maxsize=queue_size)
        self._nthreads = threads
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    def submit(self, pack: OpenPack) -> None:
        """Queue ``pack`` for upload; blocks while the queue is full."""
        with self._start_lock:
            if not self._threads:
                for i in range(self._nthreads):
                    thread = threading.Thread(
                        target=self._run, name=f"stratavault-upload-{i}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
        self._queue.put(pack)

    def wait(self) -> None:
        """Return when every submitted pack is uploaded or has failed."""
        self._queue.join()

    def close(self) -> None:
        """Finish queued uploads and stop the threads."""
        with self._start_lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(_STOP)
        for thread in threads:
            thread.join()

    def _run(self) -> None:
        while True:
            pack = self._queue.get()
            try:
                if pack is _STOP:
                    return
                self._upload(pack)
            finally:
                self._queue.task_done()

    def _upload(self, pack: OpenPack) -> None:
        try:
            try:
                sealed = seal_pack(self._keys, pack)
                with suppress(ObjectExistsError):  # content-named: the same bytes are there
                    self._storage.put_file(sealed.name, pack.file.path)
            except BaseException as exc:
                self._on_error(pack, exc)
                return
            self._on_done(sealed)
        finally:
            pack.file.remove()
