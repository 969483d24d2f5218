"""A disk served over NBD (a VM's fleecing export, an image through qemu-storage-daemon) as
the source of a disk backup."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

from stratavault.nbd import BASE_ALLOCATION, NbdClient, connect
from stratavault.sources import DiskExport

__all__ = ["NbdDiskSource"]

_HOLE = 1
_ZERO = 2
_DIRTY = 1


class NbdDiskSource:
    """One exported disk. With a dirty bitmap, :meth:`extents` lists what changed since
    the parent snapshot; without, every extent that holds data (holes and zero extents are
    skipped: they read as zeros). Reads come from several threads, each with its own
    pipelined connection."""

    def __init__(self, export: DiskExport, *, timeout_s: float = 60.0) -> None:
        self.export = export
        self.name = export.device
        self.size_bytes = export.size_bytes
        self.dirty_only = export.bitmap_context is not None
        self.bitmap = export.new_bitmap or ""
        self.path = export.device
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._clients: list[NbdClient] = []
        self._lock = threading.Lock()

    def _open(self, contexts: tuple[str, ...] = ()) -> NbdClient:
        return connect(
            self.export.socket_path, self.export.export_name,
            meta_contexts=contexts, timeout_s=self._timeout_s,
        )  # fmt: skip

    def extents(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of the regions to read, in order."""
        if not self.dirty_only:
            yield from self.data_regions()
            return
        assert self.export.bitmap_context is not None
        yield from self._flagged(self.export.bitmap_context, lambda flags: bool(flags & _DIRTY))

    def data_regions(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of the regions that hold data (not holes, not zeros)."""
        yield from self._flagged(BASE_ALLOCATION, lambda flags: not flags & (_HOLE | _ZERO))

    def _flagged(self, context: str, wanted: Callable[[int], bool]) -> Iterator[tuple[int, int]]:
        with self._open((context,)) as client:
            for extent in client.extents(context):
                if extent.length and wanted(extent.flags):
                    yield extent.offset, extent.length

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes | bytearray]:
        """The bytes of each ``(offset, length)``: requests pipelined on this thread's
        connection."""
        return list(self._client().read_ranges(ranges))

    def _client(self) -> NbdClient:
        """This thread's connection (opened on first use)."""
        client: NbdClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._open()
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def changed(self) -> bool:
        """False: an export is a frozen view (fleecing, or an image nobody else writes)."""
        return False

    def close(self) -> None:
        """Close every connection (call before the export goes away)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
