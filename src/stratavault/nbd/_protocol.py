"""The NBD protocol as sans-I/O state machines over bytes: nothing here touches a socket.

Both sides work the same way: feed received bytes with ``receive_data``, pull events with
``next_event`` (an :class:`~._events.Event`, ``NEED_DATA`` or ``PAUSED``), and send the bytes
that the ``send_*``/``reply_*`` methods return. Violations by the peer raise
:class:`~stratavault.errors.NbdProtocolError` naming what was wrong; the connection is then
unusable.

Client, fixed newstyle only::

    start -> ServerGreeting -> send_client_flags
          -> ( send_option -> OptionReplyEvent* -> (OptionAck | OptionError) )*
          -> ( GO acked | send_export_name -> ExportNameReply ) -> TRANSMISSION
          | send_abort -> end
    TRANSMISSION: ( send_request -> Reply* ... -> Reply(done=True) )* (pipelined) -> send_disconnect

Server::

    start (greeting from ``greeting()``) -> ClientFlags
          -> ( OptionRequest -> reply_* -> reply_ack | reply_error )*
          -> ( reply_ack to NBD_OPT_GO | reply_export_name ) -> TRANSMISSION
    TRANSMISSION: ( Request -> reply_simple | reply_chunk* ... done )* -> Request(DISC) -> end
"""

from __future__ import annotations

import struct
from enum import Enum

from stratavault.errors import NbdProtocolError
from stratavault.nbd import _constants as c, _events as ev, _wire as w
from stratavault.nbd._chunks import parse_chunk
from stratavault.nbd._server_protocol import ServerConnection

__all__ = ["ClientConnection", "ClientState", "ServerConnection"]

NextEvent = ev.Event | ev._Sentinel


class ClientState(Enum):
    """Where a client connection stands."""

    GREETING = "greeting"
    SEND_FLAGS = "send-flags"
    OPTIONS = "options"
    OPTION_REPLY = "option-reply"
    EXPORT_NAME_REPLY = "export-name-reply"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ClientConnection:
    """The client side of an NBD connection (fixed newstyle handshake, then transmission)."""

    def __init__(self, *, max_option_reply: int = c.MAX_OPTION_DATA) -> None:
        self.state = ClientState.GREETING
        self.structured_replies = False
        self.no_zeroes = False
        self._buf = w.ReceiveBuffer()
        self._pending_option = 0
        self._max_option_reply = max_option_reply
        self._in_flight: dict[int, tuple[int, int, int]] = {}  # handle -> command, offset, length
        self._next_handle = 1

    # -- input ---------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the server; an empty chunk means the server closed."""
        if not data:
            self._eof()
        self._buf.feed(data)

    def _eof(self) -> None:
        if self.state is ClientState.CLOSED:
            return
        where = {
            ClientState.GREETING: "before its greeting",
            ClientState.OPTION_REPLY: f"in the reply to {w.option_name(self._pending_option)}",
            ClientState.EXPORT_NAME_REPLY: "in the reply to NBD_OPT_EXPORT_NAME",
        }.get(self.state)
        if where is None and self._in_flight:
            where = f"with {len(self._in_flight)} request(s) unanswered"
        if where is not None or len(self._buf):
            raise NbdProtocolError(f"NBD connection: server closed the connection {where or ''}")
        self.state = ClientState.CLOSED

    def next_event(self) -> NextEvent:
        """The next event from the received bytes, or NEED_DATA."""
        state = self.state
        if state is ClientState.GREETING:
            return self._parse_greeting()
        if state is ClientState.OPTION_REPLY:
            return self._parse_option_reply()
        if state is ClientState.EXPORT_NAME_REPLY:
            return self._parse_export_name_reply()
        if state is ClientState.TRANSMISSION:
            return self._parse_reply()
        if len(self._buf):
            raise NbdProtocolError(
                f"NBD connection: server sent {len(self._buf)} unexpected bytes in state "
                f"{state.value}"
            )
        return ev.NEED_DATA

    # -- handshake -----------------------------------------------------------------------------
    def _parse_greeting(self) -> NextEvent:
        raw = self._buf.take(18)
        if raw is None:
            return ev.NEED_DATA
        magic, opt_magic, flags = struct.unpack(">QQH", raw)
        if magic != c.NBDMAGIC:
            raise NbdProtocolError(f"NBD greeting: bad magic {magic:#018x} (not an NBD server)")
        if opt_magic != c.IHAVEOPT:
            raise NbdProtocolError(
                f"NBD greeting: magic {opt_magic:#x} is not IHAVEOPT (oldstyle server unsupported)"
            )
        if not flags & c.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("NBD greeting: server does not offer fixed newstyle negotiation")
        self.no_zeroes = bool(flags & c.FLAG_NO_ZEROES)
        self.state = ClientState.SEND_FLAGS
        return ev.ServerGreeting(flags)

    def send_client_flags(self) -> bytes:
        """The client flags that answer the greeting."""
        self._expect(ClientState.SEND_FLAGS, "send client flags")
        self.state = ClientState.OPTIONS
        flags = c.FLAG_C_FIXED_NEWSTYLE | (c.FLAG_C_NO_ZEROES if self.no_zeroes else 0)
        return struct.pack(">I", flags)

    def _expect(self, state: ClientState, what: str) -> None:
        if self.state is not state:
            raise NbdProtocolError(f"NBD client: cannot {what} in state {self.state.value}")

    def send_option(self, opt: int, data: bytes = b"") -> bytes:
        """A raw option; its replies follow as events until OptionAck or OptionError."""
        self._expect(ClientState.OPTIONS, f"send {w.option_name(opt)}")
        self._pending_option = opt
        self.state = ClientState.OPTION_REPLY
        return w.option(opt, data)

    def send_go(self, export_name: str, *, info: bool = False) -> bytes:
        """NBD_OPT_GO (or NBD_OPT_INFO when ``info``), asking for the block size info too."""
        data = w.u32_string(export_name, "export name") + struct.pack(">HH", 1, c.INFO_BLOCK_SIZE)
        return self.send_option(c.OPT_INFO if info else c.OPT_GO, data)

    def send_meta_context(self, export_name: str, queries: list[str], *, list_: bool) -> bytes:
        """NBD_OPT_SET_META_CONTEXT (or NBD_OPT_LIST_META_CONTEXT when ``list_``)."""
        data = w.u32_string(export_name, "export name") + struct.pack(">I", len(queries))
        data += b"".join(w.u32_string(q, "meta context query") for q in queries)
        opt = c.OPT_LIST_META_CONTEXT if list_ else c.OPT_SET_META_CONTEXT
        return self.send_option(opt, data)

    def send_export_name(self, export_name: str) -> bytes:
        """NBD_OPT_EXPORT_NAME: the old way into transmission (no error reply possible)."""
        self._expect(ClientState.OPTIONS, "send NBD_OPT_EXPORT_NAME")
        self.state = ClientState.EXPORT_NAME_REPLY
        return w.option(c.OPT_EXPORT_NAME, w.encode_string(export_name, "export name"))

    def send_abort(self) -> bytes:
        """NBD_OPT_ABORT; the connection is closed afterwards (a reply, if any, is ignored)."""
        self._expect(ClientState.OPTIONS, "send NBD_OPT_ABORT")
        self.state = ClientState.CLOSED
        return w.option(c.OPT_ABORT)

    def _parse_option_reply(self) -> NextEvent:
        head = self._buf.peek(w.OPTION_REPLY_HEADER.size)
        if head is None:
            return ev.NEED_DATA
        magic, opt, rtype, length = w.OPTION_REPLY_HEADER.unpack(head)
        what = f"reply to {w.option_name(self._pending_option)}"
        if magic != c.OPTION_REPLY_MAGIC:
            raise NbdProtocolError(f"NBD {what}: bad magic {magic:#x}")
        if opt != self._pending_option:
            raise NbdProtocolError(f"NBD {what}: reply is for {w.option_name(opt)}")
        if length > self._max_option_reply:
            raise NbdProtocolError(f"NBD {what}: reply of {length} bytes is too long")
        raw = self._buf.take(w.OPTION_REPLY_HEADER.size + length)
        if raw is None:
            return ev.NEED_DATA
        return self._option_event(opt, rtype, raw[w.OPTION_REPLY_HEADER.size :], what)

    def _option_event(self, opt: int, rtype: int, data: bytes, what: str) -> ev.Event:
        if rtype & c.REP_FLAG_ERROR:
            self.state = ClientState.OPTIONS
            message = data.decode("utf-8", "replace")
            return ev.OptionError(opt, rtype, message)
        if rtype == c.REP_ACK:
            if data:
                raise NbdProtocolError(f"NBD {what}: NBD_REP_ACK carries {len(data)} bytes")
            self.state = ClientState.OPTIONS
            if opt == c.OPT_GO:
                self.state = ClientState.TRANSMISSION
            elif opt == c.OPT_STRUCTURED_REPLY:
                self.structured_replies = True
            return ev.OptionAck(opt)
        if rtype == c.REP_INFO and opt in (c.OPT_GO, c.OPT_INFO):
            return _info_event(data, what)
        if rtype == c.REP_SERVER and opt == c.OPT_LIST:
            name, pos = w.split_u32_string(data, 0, what)
            return ev.ServerEntry(name, w.decode_string(data[pos:], what))
        if rtype == c.REP_META_CONTEXT and opt in (c.OPT_SET_META_CONTEXT, c.OPT_LIST_META_CONTEXT):
            if len(data) < 4:
                raise NbdProtocolError(f"NBD {what}: NBD_REP_META_CONTEXT shorter than 4 bytes")
            (ctx_id,) = struct.unpack_from(">I", data)
            return ev.MetaContext(ctx_id, w.decode_string(data[4:], what))
        raise NbdProtocolError(f"NBD {what}: unexpected reply type {rtype:#x}")

    def _parse_export_name_reply(self) -> NextEvent:
        need = 10 if self.no_zeroes else 10 + c.HANDSHAKE_ZEROES
        raw = self._buf.take(need)
        if raw is None:
            return ev.NEED_DATA
        size, flags = struct.unpack_from(">QH", raw)
        self.state = ClientState.TRANSMISSION
        return ev.ExportNameReply(size, flags)

    # -- transmission --------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """How many requests wait for their final reply."""
        return len(self._in_flight)

    def send_request(
        self, command: int, offset: int, length: int, *, flags: int = 0, handle: int | None = None
    ) -> tuple[int, bytes]:
        """A request header (a write's payload of ``length`` bytes must follow it).

        Returns the handle (a fresh one unless given) and the bytes to send.
        """
        self._expect(ClientState.TRANSMISSION, "send a request")
        if handle is None:
            handle = self._next_handle
            self._next_handle = (self._next_handle + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        if handle in self._in_flight:
            raise NbdProtocolError(f"NBD request: handle {handle} is already in flight")
        if command == c.CMD_DISC:
            self.state = ClientState.CLOSED
        else:
            self._in_flight[handle] = (command, offset, length)
        return handle, w.REQUEST.pack(c.REQUEST_MAGIC, flags, command, handle, offset, length)

    def send_disconnect(self) -> bytes:
        """NBD_CMD_DISC: ends the transmission phase."""
        return self.send_request(c.CMD_DISC, 0, 0)[1]

    def _parse_reply(self) -> NextEvent:
        head = self._buf.peek(4)
        if head is None:
            return ev.NEED_DATA
        (magic,) = struct.unpack(">I", head)
        if magic == c.SIMPLE_REPLY_MAGIC:
            return self._parse_simple_reply()
        if magic == c.STRUCTURED_REPLY_MAGIC:
            if not self.structured_replies:
                raise NbdProtocolError("NBD reply: structured reply without negotiation")
            return self._parse_structured_reply()
        raise NbdProtocolError(f"NBD reply: bad magic {magic:#010x}")

    def _request_of(self, handle: int) -> tuple[int, int, int]:
        request = self._in_flight.get(handle)
        if request is None:
            raise NbdProtocolError(f"NBD reply: handle {handle:#x} matches no request in flight")
        return request

    def _parse_simple_reply(self) -> NextEvent:
        head = self._buf.peek(w.SIMPLE_REPLY.size)
        if head is None:
            return ev.NEED_DATA
        _, error, handle = w.SIMPLE_REPLY.unpack(head)
        command, _, length = self._request_of(handle)
        data_len = length if command == c.CMD_READ and error == 0 else 0
        if command == c.CMD_READ and error == 0 and self.structured_replies:
            raise NbdProtocolError(f"NBD reply to read {handle:#x}: simple reply with data")
        raw = self._buf.take(w.SIMPLE_REPLY.size + data_len)
        if raw is None:
            return ev.NEED_DATA
        del self._in_flight[handle]
        return ev.SimpleReply(handle, True, error, raw[w.SIMPLE_REPLY.size :])

    def _parse_structured_reply(self) -> NextEvent:
        head = self._buf.peek(w.STRUCTURED_HEADER.size)
        if head is None:
            return ev.NEED_DATA
        _, flags, rtype, handle, length = w.STRUCTURED_HEADER.unpack(head)
        command, offset, req_length = self._request_of(handle)
        limit = req_length + 8 if command == c.CMD_READ else c.DEFAULT_MAX_PAYLOAD
        if length > max(limit, c.MAX_STRING + 16):
            raise NbdProtocolError(f"NBD reply {handle:#x}: chunk of {length} bytes is too long")
        raw = self._buf.take(w.STRUCTURED_HEADER.size + length)
        if raw is None:
            return ev.NEED_DATA
        done = bool(flags & c.REPLY_FLAG_DONE)
        event = parse_chunk(
            rtype, handle, done, raw[w.STRUCTURED_HEADER.size :], command, offset, req_length
        )
        if done:
            del self._in_flight[handle]
        return event


def _info_event(data: bytes, what: str) -> ev.Event:
    if len(data) < 2:
        raise NbdProtocolError(f"NBD {what}: NBD_REP_INFO shorter than 2 bytes")
    (info_type,) = struct.unpack_from(">H", data)
    if info_type == c.INFO_EXPORT:
        if len(data) != 12:
            raise NbdProtocolError(f"NBD {what}: NBD_INFO_EXPORT of {len(data)} bytes, not 12")
        size, flags = struct.unpack_from(">QH", data, 2)
        return ev.ExportInfo(size, flags)
    if info_type == c.INFO_BLOCK_SIZE:
        if len(data) != 14:
            raise NbdProtocolError(f"NBD {what}: NBD_INFO_BLOCK_SIZE of {len(data)} bytes, not 14")
        return ev.BlockSizeInfo(*struct.unpack_from(">III", data, 2))
    if info_type in (c.INFO_NAME, c.INFO_DESCRIPTION):
        return ev.NameInfo(info_type, w.decode_string(data[2:], what))
    return ev.UnknownInfo(info_type, data[2:])
