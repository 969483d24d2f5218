"""The server side of the NBD protocol, sans-I/O (grammar in ``_protocol``'s docstring)."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import Enum

from stratavault.errors import NbdProtocolError
from stratavault.nbd import _chunks as ch, _constants as c, _events as ev, _wire as w

NextEvent = ev.Event | ev._Sentinel
_KNOWN_CLIENT_FLAGS = c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES


class ServerState(Enum):
    """Where a server connection stands."""

    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    OPTION_PENDING = "option-pending"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ServerConnection:
    """The server side of an NBD connection: parses options and requests, encodes replies."""

    def __init__(self, *, max_payload: int = c.DEFAULT_MAX_PAYLOAD) -> None:
        self.state = ServerState.CLIENT_FLAGS
        self.structured_replies = False
        self.no_zeroes = False
        self.max_payload = max_payload
        self._buf = w.ReceiveBuffer()
        self._pending_option = 0

    def greeting(self) -> bytes:
        """The first bytes the server sends."""
        flags = c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES
        return struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, flags)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client; an empty chunk means the client closed."""
        if not data:
            if len(self._buf) and self.state is not ServerState.CLOSED:
                raise NbdProtocolError(
                    f"NBD server: client closed with {len(self._buf)} bytes of a message unsent"
                )
            self.state = ServerState.CLOSED
        self._buf.feed(data)

    def next_event(self) -> NextEvent:
        """The next event from the received bytes, NEED_DATA, or PAUSED while an option waits."""
        if self.state is ServerState.CLIENT_FLAGS:
            return self._parse_flags()
        if self.state is ServerState.OPTIONS:
            return self._parse_option()
        if self.state is ServerState.TRANSMISSION:
            return self._parse_request()
        if self.state is ServerState.OPTION_PENDING:
            return ev.PAUSED
        return ev.NEED_DATA

    # -- handshake -----------------------------------------------------------------------------
    def _parse_flags(self) -> NextEvent:
        raw = self._buf.take(4)
        if raw is None:
            return ev.NEED_DATA
        (flags,) = struct.unpack(">I", raw)
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise NbdProtocolError(f"NBD handshake: unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & c.FLAG_C_NO_ZEROES)
        self.state = ServerState.OPTIONS
        return ev.ClientFlags(flags)

    def _parse_option(self) -> NextEvent:
        head = self._buf.peek(w.OPTION_HEADER.size)
        if head is None:
            return ev.NEED_DATA
        magic, opt, length = w.OPTION_HEADER.unpack(head)
        if magic != c.IHAVEOPT:
            raise NbdProtocolError(f"NBD option: bad magic {magic:#x}")
        if length > c.MAX_OPTION_DATA:
            raise NbdProtocolError(f"NBD {w.option_name(opt)}: {length} bytes of data is too long")
        raw = self._buf.take(w.OPTION_HEADER.size + length)
        if raw is None:
            return ev.NEED_DATA
        data = raw[w.OPTION_HEADER.size :]
        self._pending_option = opt
        self.state = ServerState.OPTION_PENDING
        return _option_event(opt, data)

    def _reply(self, reply_type: int, data: bytes = b"") -> bytes:
        if self.state is not ServerState.OPTION_PENDING:
            raise NbdProtocolError(f"NBD server: no option to reply to in state {self.state.value}")
        return w.option_reply(self._pending_option, reply_type, data)

    def reply_info_export(self, size_bytes: int, transmission_flags: int) -> bytes:
        """NBD_INFO_EXPORT for NBD_OPT_GO/INFO."""
        data = struct.pack(">HQH", c.INFO_EXPORT, size_bytes, transmission_flags)
        return self._reply(c.REP_INFO, data)

    def reply_info_block_size(self, minimum: int, preferred: int, maximum: int) -> bytes:
        """NBD_INFO_BLOCK_SIZE for NBD_OPT_GO/INFO."""
        data = struct.pack(">HIII", c.INFO_BLOCK_SIZE, minimum, preferred, maximum)
        return self._reply(c.REP_INFO, data)

    def reply_server(self, name: str, description: str = "") -> bytes:
        """One NBD_REP_SERVER entry for NBD_OPT_LIST."""
        data = w.u32_string(name, "export name") + w.encode_string(description, "description")
        return self._reply(c.REP_SERVER, data)

    def reply_meta_context(self, context_id: int, name: str) -> bytes:
        """One NBD_REP_META_CONTEXT for the META_CONTEXT options."""
        data = struct.pack(">I", context_id) + w.encode_string(name, "meta context")
        return self._reply(c.REP_META_CONTEXT, data)

    def reply_ack(self) -> bytes:
        """NBD_REP_ACK: final success; after NBD_OPT_GO, transmission begins."""
        out = self._reply(c.REP_ACK)
        opt = self._pending_option
        self.state = ServerState.OPTIONS
        if opt == c.OPT_GO:
            self.state = ServerState.TRANSMISSION
        elif opt == c.OPT_STRUCTURED_REPLY:
            self.structured_replies = True
        elif opt == c.OPT_ABORT:
            self.state = ServerState.CLOSED
        return out

    def reply_error(self, reply_type: int, message: str) -> bytes:
        """A final NBD_REP_ERR_* reply with a message."""
        if not reply_type & c.REP_FLAG_ERROR:
            raise NbdProtocolError(f"NBD server: reply type {reply_type:#x} is not an error")
        out = self._reply(reply_type, message.encode("utf-8")[:1024])
        self.state = ServerState.OPTIONS
        return out

    def reply_export_name(self, size_bytes: int, transmission_flags: int) -> bytes:
        """The reply to NBD_OPT_EXPORT_NAME; transmission begins."""
        if self.state is not ServerState.OPTION_PENDING or self._pending_option != (
            c.OPT_EXPORT_NAME
        ):
            raise NbdProtocolError("NBD server: no NBD_OPT_EXPORT_NAME to reply to")
        self.state = ServerState.TRANSMISSION
        zeroes = b"" if self.no_zeroes else bytes(c.HANDSHAKE_ZEROES)
        return struct.pack(">QH", size_bytes, transmission_flags) + zeroes

    # -- transmission --------------------------------------------------------------------------
    def _parse_request(self) -> NextEvent:
        head = self._buf.peek(w.REQUEST.size)
        if head is None:
            return ev.NEED_DATA
        magic, flags, command, handle, offset, length = w.REQUEST.unpack(head)
        if magic != c.REQUEST_MAGIC:
            raise NbdProtocolError(f"NBD request: bad magic {magic:#010x}")
        data_len = length if command == c.CMD_WRITE else 0
        if data_len > self.max_payload:
            raise NbdProtocolError(
                f"NBD write request {handle:#x}: payload of {length} bytes exceeds the maximum "
                f"{self.max_payload}"
            )
        raw = self._buf.take(w.REQUEST.size + data_len)
        if raw is None:
            return ev.NEED_DATA
        if command == c.CMD_DISC:
            self.state = ServerState.CLOSED
        return ev.Request(command, flags, handle, offset, length, raw[w.REQUEST.size :])

    def reply_simple(self, handle: int, error: int = 0) -> bytes:
        """A simple reply header; a successful read without structured replies appends data."""
        return w.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, handle)

    def reply_data_header(self, handle: int, offset: int, size: int, *, done: bool) -> bytes:
        """Header of an OFFSET_DATA chunk; ``size`` bytes of data must follow."""
        return ch.data_chunk_header(handle, offset, size, done=done)

    def reply_hole(self, handle: int, offset: int, size: int, *, done: bool) -> bytes:
        """An OFFSET_HOLE chunk."""
        return ch.hole_chunk(handle, offset, size, done=done)

    def reply_block_status(
        self, handle: int, context_id: int, extents: Iterable[tuple[int, int]], *, done: bool
    ) -> bytes:
        """A BLOCK_STATUS chunk for one context."""
        return ch.block_status_chunk(handle, context_id, extents, done=done)

    def reply_error_chunk(
        self, handle: int, error: int, message: str, *, offset: int | None = None
    ) -> bytes:
        """The error reply to a request: a structured error chunk, or a simple reply."""
        if not self.structured_replies:
            return self.reply_simple(handle, error)
        return ch.error_chunk(handle, error, message, offset=offset)

    def reply_done(self, handle: int) -> bytes:
        """The end of a structured reply (a NONE chunk with DONE)."""
        return ch.none_chunk(handle)


def _option_event(opt: int, data: bytes) -> ev.OptionRequest:
    what = w.option_name(opt)
    if opt == c.OPT_EXPORT_NAME:
        return ev.OptionRequest(opt, export_name=w.decode_string(data, what))
    if opt in (c.OPT_GO, c.OPT_INFO):
        name, pos = w.split_u32_string(data, 0, what)
        if pos + 2 > len(data):
            raise NbdProtocolError(f"NBD {what}: truncated before the number of info requests")
        (n,) = struct.unpack_from(">H", data, pos)
        if pos + 2 + 2 * n != len(data):
            raise NbdProtocolError(f"NBD {what}: {n} info requests do not match the data length")
        infos = struct.unpack_from(f">{n}H", data, pos + 2)
        return ev.OptionRequest(opt, export_name=name, info_requests=infos)
    if opt in (c.OPT_SET_META_CONTEXT, c.OPT_LIST_META_CONTEXT):
        name, pos = w.split_u32_string(data, 0, what)
        if pos + 4 > len(data):
            raise NbdProtocolError(f"NBD {what}: truncated before the number of queries")
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(min(n, 1024)):
            query, pos = w.split_u32_string(data, pos, what)
            queries.append(query)
        if len(queries) != n or pos != len(data):
            raise NbdProtocolError(f"NBD {what}: {n} queries do not match the data length")
        return ev.OptionRequest(opt, export_name=name, queries=tuple(queries))
    if opt in (c.OPT_LIST, c.OPT_ABORT, c.OPT_STRUCTURED_REPLY) and data:
        raise NbdProtocolError(f"NBD {what}: carries {len(data)} bytes of data, expected none")
    return ev.OptionRequest(opt, data=data)
