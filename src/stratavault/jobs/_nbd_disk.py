"""A disk exported over NBD as a restore target (qemu-nbd, qemu-storage-daemon, a VM).

The export's image format is the server's business: restoring to a qcow2 file served by
``qemu-nbd -f qcow2`` writes qcow2. Each worker thread gets its own connection (an
:class:`NbdClient` is not shared between threads); the server must accept several
(``qemu-nbd --shared=N``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from stratavault.errors import RestoreError
from stratavault.nbd import BASE_ALLOCATION, NbdClient, connect, constants

__all__ = ["NbdDiskTarget", "is_nbd_uri"]

_ZERO_FLAG = 2
"""``base:allocation``: the extent reads as zeroes."""
_ZEROS = bytes(1 << 20)


def is_nbd_uri(text: str) -> bool:
    """Whether ``text`` names an NBD export (``nbd://`` or ``nbd+unix://``)."""
    return text.startswith(("nbd://", "nbd+unix://"))


class NbdDiskTarget:
    """An NBD export being restored onto; at least ``size_bytes`` large and writable."""

    fresh = False
    """Its old content is unknown: zero chunks are written as zeroes."""
    write_batch_bytes = 8 << 20
    """Chunks written together, their requests pipelined (a round trip per 8 MiB, not per
    chunk: a changed-only restore of scattered chunks took ~10 % longer one by one)."""

    def __init__(self, uri: str, size_bytes: int) -> None:
        self.changed: list[tuple[int, int]] | None = None
        """What changed on the export since the snapshot, when a dirty bitmap tells: then
        a changed-only restore writes exactly that and reads nothing."""
        self.uri = uri
        self.size_bytes = size_bytes
        self._local = threading.local()
        self._clients: list[NbdClient] = []
        self._lock = threading.Lock()
        first = self._client()
        if first.read_only:
            self.close()
            raise RestoreError(f"restoring disk to {uri} - the NBD export is read-only")
        if first.size < size_bytes:
            self.close()
            raise RestoreError(
                f"restoring disk to {uri} - the export has {first.size} bytes, "
                f"the disk {size_bytes}"
            )

    def _client(self) -> NbdClient:
        client: NbdClient | None = getattr(self._local, "client", None)
        if client is None:
            client = connect(self.uri, meta_contexts=[BASE_ALLOCATION])
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def write_ranges(self, items: Sequence[tuple[int, bytes | memoryview]]) -> None:
        """Write each ``(offset, data)``, the requests pipelined on this thread's connection."""
        self._client().write_ranges(items)

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeroes (write-zeroes, or plain zeroes if not offered)."""
        client = self._client()
        if client.transmission_flags & constants.FLAG_SEND_WRITE_ZEROES:
            client.write_zeroes(offset, length)
            return
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            client.write(offset, memoryview(_ZEROS)[:n])
            offset += n

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        return self._client().read(offset, length)

    def data_extents(self) -> list[tuple[int, int]]:
        """The ranges that may hold data (``base:allocation``; everything without it)."""
        client = self._client()
        if BASE_ALLOCATION not in client.contexts:
            return [(0, self.size_bytes)]
        return [
            (e.offset, min(e.end, self.size_bytes) - e.offset)
            for e in client.extents(length=self.size_bytes)
            if not e.flags & _ZERO_FLAG
        ]

    def sync(self) -> None:
        """Flush every connection's completed writes."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            if client.transmission_flags & constants.FLAG_SEND_FLUSH:
                client.flush()

    def close(self) -> None:
        """Disconnect every connection."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> NbdDiskTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
