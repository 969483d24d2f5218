"""A blocking NBD client over a socket, with several requests in flight."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from stratavault.errors import NbdError, NbdProtocolError
from stratavault.nbd import _constants as c, _events as ev
from stratavault.nbd._protocol import ClientConnection
from stratavault.nbd._wire import error_name

_COMMAND_NAMES = {
    c.CMD_READ: "read",
    c.CMD_WRITE: "write",
    c.CMD_FLUSH: "flush",
    c.CMD_TRIM: "trim",
    c.CMD_WRITE_ZEROES: "write-zeroes",
    c.CMD_BLOCK_STATUS: "block-status",
}
_RECV_BYTES = 4 * 1024 * 1024
_BLOCK_STATUS_SPAN = 1 << 31


@dataclass(frozen=True)
class Extent:
    """A run of bytes with the same flags in one metadata context.

    For ``base:allocation`` flag 1 is a hole and 2 reads as zeroes; for
    ``qemu:dirty-bitmap:NAME`` flag 1 is dirty.
    """

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        """The offset just past the extent."""
        return self.offset + self.length


@dataclass
class _Op:
    command: int
    offset: int
    length: int
    on_reply: Callable[[ev.Reply], None] | None = None
    flags: int = 0
    payload: memoryview | None = None
    errors: list[str] = field(default_factory=list)


class NbdClient:
    """An open NBD connection to one export, in the transmission phase.

    Use :func:`connect` to make one. Every method blocks; a server silent for ``timeout_s``
    raises :class:`NbdError`, and malformed replies raise :class:`NbdProtocolError`.
    """

    def __init__(
        self,
        sock: socket.socket,
        conn: ClientConnection,
        *,
        export: str,
        address: str,
        size_bytes: int,
        transmission_flags: int,
        block_sizes: tuple[int, int, int] | None,
        contexts: dict[str, int],
        timeout_s: float,
        in_flight: int = 32,
        request_bytes: int = 512 * 1024,
    ) -> None:
        self._sock = sock
        self._conn = conn
        self.export = export
        self.address = address
        self.size_bytes = size_bytes
        self.transmission_flags = transmission_flags
        self.block_sizes = block_sizes
        self.contexts = dict(contexts)
        self.timeout_s = timeout_s
        self.in_flight = max(1, in_flight)
        self.max_request_bytes = block_sizes[2] if block_sizes else c.DEFAULT_MAX_PAYLOAD
        self.request_bytes = max(1, min(request_bytes, self.max_request_bytes))
        self._recv_buf = bytearray(_RECV_BYTES)
        self._closed = False
        self._broken = ""

    # -- properties ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """The export's size in bytes."""
        return self.size_bytes

    @property
    def read_only(self) -> bool:
        """The server refuses writes to this export."""
        return bool(self.transmission_flags & c.FLAG_READ_ONLY)

    def _can(self, flag: int, what: str) -> None:
        if not self.transmission_flags & flag:
            raise NbdError(f"NBD {what} on export {self.export!r}: the server does not allow it")

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect politely (NBD_CMD_DISC) and close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._conn.in_flight == 0:
                self._sock.sendall(self._conn.send_disconnect())
            self._sock.shutdown(socket.SHUT_RDWR)
        except (OSError, NbdProtocolError):
            pass
        finally:
            self._sock.close()

    # -- commands ------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` (several requests in flight)."""
        view = memoryview(buffer).cast("B")
        self._check_range(offset, len(view), "read")
        self._run(self._read_ops(offset, view))

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytearray]:
        """The bytes of each ``(offset, length)`` range, in order, the requests of all of
        them pipelined (many small reads cost one round trip, not one each)."""
        buffers = [bytearray(length) for _, length in ranges]
        for offset, length in ranges:
            self._check_range(offset, length, "read")
        pairs = zip(ranges, buffers, strict=True)
        self._run(op for (at, _), buf in pairs for op in self._read_ops(at, memoryview(buf)))
        return buffers

    def _read_ops(self, offset: int, view: memoryview) -> Iterator[_Op]:
        """Read requests (of at most ``request_bytes``) filling ``view`` from ``offset``."""
        for at, n in self._pieces(offset, len(view), self.request_bytes):
            op = _Op(c.CMD_READ, at, n)
            op.on_reply = self._reader(op, view[at - offset : at - offset + n])
            yield op

    def _reader(self, op: _Op, view: memoryview) -> Callable[[ev.Reply], None]:
        covered = [0]

        def on_reply(event: ev.Reply) -> None:
            if isinstance(event, ev.SimpleReply):
                if not event.error:
                    view[:] = event.data
                    covered[0] = op.length
            elif isinstance(event, ev.DataChunk):
                at = event.offset - op.offset
                view[at : at + len(event.data)] = event.data
                covered[0] += len(event.data)
            elif isinstance(event, ev.HoleChunk):
                at = event.offset - op.offset
                view[at : at + event.length] = bytes(event.length)
                covered[0] += event.length
            if event.done and not op.errors and covered[0] != op.length:
                raise NbdProtocolError(
                    f"NBD read [{op.offset}, +{op.length}) from export {self.export!r}: "
                    f"the reply covered {covered[0]} bytes"
                )

        return on_reply

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write ``data`` at ``offset`` (``fua``: durable before the reply)."""
        self.write_ranges([(offset, data)], fua=fua)

    def write_ranges(
        self, items: Sequence[tuple[int, bytes | bytearray | memoryview]], *, fua: bool = False
    ) -> None:
        """Write each ``(offset, data)``, the requests of all of them pipelined."""
        self._can_write("write")
        views = [(offset, memoryview(data).cast("B")) for offset, data in items]
        for offset, view in views:
            self._check_range(offset, len(view), "write")
        flags = c.CMD_FLAG_FUA if fua else 0
        self._run(
            _Op(c.CMD_WRITE, at, n, flags=flags, payload=view[at - offset : at - offset + n])
            for offset, view in views
            for at, n in self._pieces(offset, len(view), self.request_bytes)
        )

    def flush(self) -> None:
        """Make every completed write durable."""
        self._can(c.FLAG_SEND_FLUSH, "flush")
        self._run([_Op(c.CMD_FLUSH, 0, 0)])

    def trim(self, offset: int, length: int) -> None:
        """Tell the server the range is no longer needed (it may read back as anything)."""
        self._can_write("trim")
        self._can(c.FLAG_SEND_TRIM, "trim")
        self._check_range(offset, length, "trim")
        self._run(
            _Op(c.CMD_TRIM, at, n) for at, n in self._pieces(offset, length, self.max_request_bytes)
        )

    def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        """Make the range read as zeroes (``no_hole``: keep it allocated)."""
        self._can_write("write-zeroes")
        self._can(c.FLAG_SEND_WRITE_ZEROES, "write-zeroes")
        self._check_range(offset, length, "write-zeroes")
        flags = c.CMD_FLAG_NO_HOLE if no_hole else 0
        self._run(
            _Op(c.CMD_WRITE_ZEROES, at, n, flags=flags)
            for at, n in self._pieces(offset, length, self.max_request_bytes)
        )

    def block_status(
        self, offset: int, length: int, context: str = c.CONTEXT_BASE_ALLOCATION
    ) -> list[Extent]:
        """The extents the server reports for ``context`` from ``offset``: at least one, maybe
        fewer than ``length`` bytes (partial answer; one request asks for at most 2 GiB),
        clipped to ``length``; none when ``length`` is 0."""
        ctx_id = self.contexts.get(context)
        if ctx_id is None:
            raise NbdError(
                f"NBD block-status on export {self.export!r}: context {context!r} was not "
                f"negotiated (have: {', '.join(self.contexts) or 'none'})"
            )
        self._check_range(offset, length, "block-status")
        if length == 0:
            return []
        length = min(length, _BLOCK_STATUS_SPAN)
        found: list[Extent] = []

        def on_reply(event: ev.Reply) -> None:
            if isinstance(event, ev.BlockStatusChunk) and event.context_id == ctx_id:
                at = offset
                for n, flags in event.extents:
                    n = min(n, offset + length - at)
                    if n <= 0:
                        break
                    found.append(Extent(at, n, flags))
                    at += n

        self._run([_Op(c.CMD_BLOCK_STATUS, offset, length, on_reply)])
        if not found:
            raise NbdProtocolError(
                f"NBD block-status [{offset}, +{length}) on export {self.export!r}: "
                f"no extent for context {context!r}"
            )
        return found

    def extents(
        self,
        context: str = c.CONTEXT_BASE_ALLOCATION,
        *,
        offset: int = 0,
        length: int | None = None,
    ) -> Iterator[Extent]:
        """Every extent of ``context`` over the range (the whole disk by default), in order,
        with neighbours of equal flags merged; partial answers are followed up."""
        end = self.size_bytes if length is None else offset + length
        pending: Extent | None = None
        while offset < end:
            for extent in self.block_status(offset, min(end - offset, _BLOCK_STATUS_SPAN), context):
                if pending is not None and pending.flags == extent.flags:
                    pending = Extent(pending.offset, pending.length + extent.length, pending.flags)
                    continue
                if pending is not None:
                    yield pending
                pending = extent
            assert pending is not None
            offset = pending.end
        if pending is not None:
            yield pending

    # -- machinery -----------------------------------------------------------------------------
    def _can_write(self, what: str) -> None:
        if self.read_only:
            raise NbdError(f"NBD {what} on export {self.export!r}: the export is read-only")

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise NbdError(
                f"NBD {what} [{offset}, +{length}) on export {self.export!r}: outside the "
                f"export of {self.size_bytes} bytes"
            )

    @staticmethod
    def _pieces(offset: int, length: int, step: int) -> Iterator[tuple[int, int]]:
        end = offset + length
        while offset < end:
            n = min(step, end - offset)
            yield offset, n
            offset += n

    def _run(self, ops: Iterable[_Op]) -> None:
        """Send the operations with up to ``in_flight`` outstanding; raise the first error
        after every sent request has its final reply."""
        if self._broken:
            raise NbdError(
                f"NBD request on export {self.export!r}: the connection failed before "
                f"({self._broken})"
            )
        if self._closed:
            raise NbdError(f"NBD request on export {self.export!r}: the connection is closed")
        try:
            failed = self._exchange(iter(ops))
        except NbdError as exc:  # the stream is out of step: nothing more can be trusted
            self._broken = str(exc)
            self.close()
            raise
        if failed:
            raise NbdError(failed[0])

    def _exchange(self, source: Iterator[_Op]) -> list[str]:
        pending: dict[int, _Op] = {}
        failed: list[str] = []
        while True:
            while not failed and len(pending) < self.in_flight:
                op = next(source, None)
                if op is None:
                    break
                pending[self._send(op)] = op
            if not pending:
                break
            event = self._next_reply()
            op = pending[event.handle]
            self._dispatch(op, event)
            if event.done:
                del pending[event.handle]
                failed.extend(op.errors)
        return failed

    def _dispatch(self, op: _Op, event: ev.Reply) -> None:
        error = getattr(event, "error", 0)
        if error:
            message = getattr(event, "message", "")
            what = _COMMAND_NAMES.get(op.command, str(op.command))
            op.errors.append(
                f"NBD {what} [{op.offset}, +{op.length}) on export {self.export!r} at "
                f"{self.address}: server error {error_name(error)}"
                + (f" - {message}" if message else "")
            )
        if op.on_reply is not None:
            op.on_reply(event)

    def _send(self, op: _Op) -> int:
        handle, header = self._conn.send_request(op.command, op.offset, op.length, flags=op.flags)
        try:
            if op.payload is None:
                self._sock.sendall(header)
            else:
                self._sock.sendall(header)
                self._sock.sendall(op.payload)
        except TimeoutError:
            raise self._silent() from None
        except OSError as exc:
            raise NbdError(f"NBD send to {self.address}: {exc.strerror or exc}") from None
        return handle

    def _silent(self) -> NbdError:
        return NbdError(
            f"NBD export {self.export!r} at {self.address}: server sent nothing for "
            f"{self.timeout_s} s with {self._conn.in_flight} request(s) waiting"
        )

    def _next_reply(self) -> ev.Reply:
        return _next_event(self._sock, self._conn, self._recv_buf, self._silent, ev.Reply)


T = TypeVar("T")


def _next_event(
    sock: socket.socket,
    conn: ClientConnection,
    buf: bytearray,
    silent: Callable[[], NbdError],
    kind: type[T],
) -> T:
    """Receive until the connection yields an event of ``kind``."""
    view = memoryview(buf)
    while True:
        event = conn.next_event()
        if event is ev.NEED_DATA:
            try:
                n = sock.recv_into(view)
            except TimeoutError:
                raise silent() from None
            except OSError as exc:
                raise NbdError(f"NBD receive: {exc.strerror or exc}") from None
            conn.receive_data(view[:n])
            if n == 0:  # the connection raised if a reply was cut; anyway nothing more comes
                raise NbdError("NBD receive: the server closed the connection")
            continue
        if not isinstance(event, kind):
            raise NbdProtocolError(f"NBD connection: unexpected {event!r}")
        return event


def negotiate_events(
    sock: socket.socket, conn: ClientConnection, data: bytes, silent: Callable[[], NbdError]
) -> list[ev.Event]:
    """Send an option and collect its replies up to the final one."""
    try:
        sock.sendall(data)
    except OSError as exc:
        raise NbdError(f"NBD handshake send: {exc.strerror or exc}") from None
    buf = bytearray(65536)
    events: list[ev.Event] = []
    while True:
        event = _next_event(sock, conn, buf, silent, ev.Event)
        events.append(event)
        if isinstance(event, ev.OptionAck | ev.OptionError | ev.ExportNameReply):
            return events


def first_event(
    sock: socket.socket, conn: ClientConnection, silent: Callable[[], NbdError]
) -> ev.Event:
    """The first event (the greeting)."""
    return _next_event(sock, conn, bytearray(4096), silent, ev.Event)
