"""The sans-I/O NBD state machines on bytes: both sides of the handshake, every reply kind,
and malformed or truncated input."""

from __future__ import annotations

import struct

import pytest

from stratavault.errors import NbdProtocolError
from stratavault.nbd import (
    NEED_DATA,
    PAUSED,
    BlockSizeInfo,
    BlockStatusChunk,
    ClientConnection,
    ClientFlags,
    ClientState,
    DataChunk,
    ErrorChunk,
    ExportInfo,
    ExportNameReply,
    HoleChunk,
    MetaContext,
    NoneChunk,
    OptionAck,
    OptionError,
    OptionRequest,
    Request,
    ServerConnection,
    ServerEntry,
    ServerGreeting,
    ServerState,
    SimpleReply,
    constants as c,
)


def pump(data: bytes, into: ClientConnection | ServerConnection) -> list[object]:
    into.receive_data(data)
    events = []
    while True:
        event = into.next_event()
        if event is NEED_DATA or event is PAUSED:
            return events
        events.append(event)


def handshake(*, structured: bool = True) -> tuple[ClientConnection, ServerConnection]:
    """Both machines through greeting, structured replies and GO of export "disk"."""
    client, server = ClientConnection(), ServerConnection()
    assert pump(server.greeting(), client) == [ServerGreeting(c.FLAG_FIXED_NEWSTYLE | 2)]
    assert pump(client.send_client_flags(), server) == [ClientFlags(3)]
    if structured:
        assert pump(client.send_option(c.OPT_STRUCTURED_REPLY), server) == [
            OptionRequest(c.OPT_STRUCTURED_REPLY)
        ]
        assert pump(server.reply_ack(), client) == [OptionAck(c.OPT_STRUCTURED_REPLY)]
        assert client.structured_replies and server.structured_replies
    [go] = pump(client.send_go("disk"), server)
    assert go == OptionRequest(c.OPT_GO, export_name="disk", info_requests=(c.INFO_BLOCK_SIZE,))
    replies = server.reply_info_export(1 << 30, 3) + server.reply_info_block_size(1, 4096, 1 << 25)
    assert pump(replies + server.reply_ack(), client) == [
        ExportInfo(1 << 30, 3),
        BlockSizeInfo(1, 4096, 1 << 25),
        OptionAck(c.OPT_GO),
    ]
    assert client.state is ClientState.TRANSMISSION
    assert server.state is ServerState.TRANSMISSION
    return client, server


def test_greeting_bytes_are_the_protocol_s() -> None:
    server = ServerConnection()
    assert server.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    client = ClientConnection()
    pump(server.greeting(), client)
    assert client.send_client_flags() == b"\x00\x00\x00\x03"


def test_option_and_request_encoding_is_exact() -> None:
    client, _ = handshake()
    handle, header = client.send_request(c.CMD_READ, 4096, 512, handle=7)
    assert handle == 7
    assert header == bytes.fromhex("25609513 0000 0000 0000000000000007 0000000000001000 00000200")
    fresh = ClientConnection()
    pump(ServerConnection().greeting(), fresh)
    fresh.send_client_flags()
    assert fresh.send_go("ab") == (
        b"IHAVEOPT" + struct.pack(">II", c.OPT_GO, 10) + b"\0\0\0\x02ab" + b"\0\x01\0\x03"
    )


def test_handshake_both_sides_with_meta_context_list_info_and_abort() -> None:
    client, server = ClientConnection(), ServerConnection()
    pump(server.greeting(), client)
    pump(client.send_client_flags(), server)
    pump(client.send_option(c.OPT_STRUCTURED_REPLY), server)
    pump(server.reply_ack(), client)
    # LIST
    assert pump(client.send_option(c.OPT_LIST), server) == [OptionRequest(c.OPT_LIST)]
    out = server.reply_server("a", "first") + server.reply_server("b") + server.reply_ack()
    assert pump(out, client) == [ServerEntry("a", "first"), ServerEntry("b", ""), OptionAck(3)]
    # SET_META_CONTEXT and LIST_META_CONTEXT
    queries = ["base:allocation", "qemu:dirty-bitmap:bm0"]
    [req] = pump(client.send_meta_context("disk", queries, list_=False), server)
    assert req == OptionRequest(c.OPT_SET_META_CONTEXT, export_name="disk", queries=tuple(queries))
    out = server.reply_meta_context(1, "base:allocation") + server.reply_ack()
    assert pump(out, client) == [MetaContext(1, "base:allocation"), OptionAck(10)]
    [req] = pump(client.send_meta_context("disk", [], list_=True), server)
    assert req.option == c.OPT_LIST_META_CONTEXT and req.queries == ()
    out = server.reply_error(c.REP_ERR_UNKNOWN, "no such export")
    assert pump(out, client) == [OptionError(9, c.REP_ERR_UNKNOWN, "no such export")]
    # INFO leaves the client in the option phase
    pump(client.send_go("disk", info=True), server)
    out = server.reply_info_export(512, 1) + server.reply_ack()
    assert pump(out, client) == [ExportInfo(512, 1), OptionAck(c.OPT_INFO)]
    assert client.state is ClientState.OPTIONS and server.state is ServerState.OPTIONS
    # ABORT
    assert pump(client.send_abort(), server) == [OptionRequest(c.OPT_ABORT)]
    server.reply_ack()
    assert client.state is ClientState.CLOSED and server.state is ServerState.CLOSED


def test_export_name_option_with_and_without_zeroes() -> None:
    for no_zeroes in (True, False):
        client, server = ClientConnection(), ServerConnection()
        pump(server.greeting(), client)
        client.no_zeroes = no_zeroes
        pump(client.send_client_flags(), server)
        [req] = pump(client.send_export_name("x"), server)
        assert req == OptionRequest(c.OPT_EXPORT_NAME, export_name="x")
        reply = server.reply_export_name(4096, 1)
        assert len(reply) == (10 if no_zeroes else 134)
        assert pump(reply[:-1], client) == []
        assert pump(reply[-1:], client) == [ExportNameReply(4096, 1)]
        assert client.state is ClientState.TRANSMISSION


def test_server_pauses_until_the_option_is_answered() -> None:
    client, server = ClientConnection(), ServerConnection()
    pump(server.greeting(), client)
    pump(client.send_client_flags(), server)
    data = client.send_option(c.OPT_STRUCTURED_REPLY)
    server.receive_data(data + data)
    assert isinstance(server.next_event(), OptionRequest)
    assert server.next_event() is PAUSED
    server.reply_ack()
    assert isinstance(server.next_event(), OptionRequest)


def test_simple_replies_read_and_write() -> None:
    client, server = handshake(structured=False)
    h_read, header = client.send_request(c.CMD_READ, 0, 4)
    h_write, wheader = client.send_request(c.CMD_WRITE, 8, 3)
    assert client.in_flight == 2
    events = pump(header + wheader + b"abc", server)
    assert events == [
        Request(c.CMD_READ, 0, h_read, 0, 4),
        Request(c.CMD_WRITE, 0, h_write, 8, 3, b"abc"),
    ]
    # replies out of order, the read's data split over two receives
    out = server.reply_simple(h_write) + server.reply_simple(h_read) + b"data"
    assert pump(out[:-2], client) == [SimpleReply(h_write, True, 0, b"")]
    assert pump(out[-2:], client) == [SimpleReply(h_read, True, 0, b"data")]
    assert client.in_flight == 0
    h_err, header = client.send_request(c.CMD_READ, 0, 4)
    assert pump(server.reply_simple(h_err, c.EIO), client) == [SimpleReply(h_err, True, c.EIO)]


def test_structured_reply_kinds() -> None:
    client, server = handshake()
    h, _ = client.send_request(c.CMD_READ, 1000, 100)
    out = (
        server.reply_data_header(h, 1000, 10, done=False)
        + b"0123456789"
        + server.reply_hole(h, 1010, 80, done=False)
        + server.reply_error_chunk(h, c.EIO, "bad sector", offset=1090)[: -0 or None]
    )
    events = pump(out, client)
    assert events[0] == DataChunk(h, False, 1000, b"0123456789")
    assert events[1] == HoleChunk(h, False, 1010, 80)
    assert events[2] == ErrorChunk(h, True, c.EIO, "bad sector", 1090)
    assert client.in_flight == 0
    h, _ = client.send_request(c.CMD_BLOCK_STATUS, 0, 1 << 20)
    out = server.reply_block_status(h, 1, [(4096, 3), (8192, 0)], done=False)
    out += server.reply_block_status(h, 2, [(1 << 20, 1)], done=False) + server.reply_done(h)
    assert pump(out, client) == [
        BlockStatusChunk(h, False, 1, ((4096, 3), (8192, 0))),
        BlockStatusChunk(h, False, 2, ((1 << 20, 1),)),
        NoneChunk(h, True),
    ]
    h, _ = client.send_request(c.CMD_FLUSH, 0, 0)
    assert pump(server.reply_error_chunk(h, c.ENOSPC, "full"), client) == [
        ErrorChunk(h, True, c.ENOSPC, "full", None)
    ]


def in_transmission() -> tuple[ClientConnection, int]:
    client, _ = handshake()
    handle, _ = client.send_request(c.CMD_READ, 0, 16)
    return client, handle


def structured(handle: int, rtype: int, payload: bytes, flags: int = 1) -> bytes:
    header = struct.pack(">IHHQI", c.STRUCTURED_REPLY_MAGIC, flags, rtype, handle, len(payload))
    return header + payload


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda h: b"\x12\x34\x56\x78" + bytes(12), "bad magic"),
        (lambda h: struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, h + 1), "no request"),
        (lambda h: structured(h, 99, b""), "unknown chunk type"),
        (
            lambda h: structured(h, c.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 8) + b"x" * 16),
            "outside",
        ),
        (lambda h: structured(h, c.REPLY_TYPE_OFFSET_HOLE, struct.pack(">Q", 0)), "not 12"),
        (lambda h: structured(h, c.REPLY_TYPE_BLOCK_STATUS, bytes(12)), "block status chunk"),
        (
            lambda h: structured(h, c.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 50) + b"x"),
            "message length",
        ),
        (lambda h: structured(h, c.REPLY_TYPE_NONE, b"", flags=0), "without DONE"),
        (lambda h: structured(h, c.REPLY_TYPE_OFFSET_DATA, bytes(1 << 20)), "too long"),
        (lambda h: struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, h), "simple reply with data"),
    ],
)
def test_malformed_replies_raise_naming_the_fault(make: object, words: str) -> None:
    client, handle = in_transmission()
    with pytest.raises(NbdProtocolError, match=words):
        pump(make(handle), client)  # type: ignore[operator]


def test_truncated_reply_then_eof_raises() -> None:
    client, server = handshake()
    h, _ = client.send_request(c.CMD_READ, 0, 100)
    out = server.reply_data_header(h, 0, 100, done=True) + b"x" * 60
    assert pump(out, client) == []
    with pytest.raises(NbdProtocolError, match="closed the connection with 1 request"):
        pump(b"", client)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"NBDMAGIC" + struct.pack(">QH", 0x00420281861253, 0), "oldstyle"),
        (b"XBDMAGIC" + b"IHAVEOPT\0\x03", "bad magic"),
        (b"NBDMAGICIHAVEOPT\0\0", "fixed newstyle"),
    ],
)
def test_bad_greetings(data: bytes, words: str) -> None:
    with pytest.raises(NbdProtocolError, match=words):
        pump(data, ClientConnection())


def test_truncated_greeting_then_eof() -> None:
    client = ClientConnection()
    assert pump(b"NBDMAGIC", client) == []
    with pytest.raises(NbdProtocolError, match="before its greeting"):
        pump(b"", client)


def test_bad_option_replies() -> None:
    def ready() -> ClientConnection:
        client = ClientConnection()
        pump(ServerConnection().greeting(), client)
        client.send_client_flags()
        client.send_go("d")
        return client

    head = struct.Struct(">QIII")
    cases = [
        (head.pack(1, c.OPT_GO, c.REP_ACK, 0), "bad magic"),
        (head.pack(c.OPTION_REPLY_MAGIC, c.OPT_LIST, c.REP_ACK, 0), "reply is for NBD_OPT_LIST"),
        (head.pack(c.OPTION_REPLY_MAGIC, c.OPT_GO, c.REP_INFO, 4) + b"\0\0\0\0", "not 12"),
        (head.pack(c.OPTION_REPLY_MAGIC, c.OPT_GO, c.REP_SERVER, 0), "unexpected reply type"),
        (head.pack(c.OPTION_REPLY_MAGIC, c.OPT_GO, c.REP_ACK, 1 << 30), "too long"),
    ]
    for data, words in cases:
        with pytest.raises(NbdProtocolError, match=words):
            pump(data, ready())
    client = ready()
    pump(head.pack(c.OPTION_REPLY_MAGIC, c.OPT_GO, c.REP_INFO, 12)[:-1], client)
    with pytest.raises(NbdProtocolError, match="in the reply to NBD_OPT_GO"):
        pump(b"", client)


def test_malformed_client_input_on_the_server() -> None:
    def options() -> ServerConnection:
        server = ServerConnection()
        pump(struct.pack(">I", 1), server)
        return server

    with pytest.raises(NbdProtocolError, match="unknown client flags"):
        pump(struct.pack(">I", 0x80), ServerConnection())
    with pytest.raises(NbdProtocolError, match="bad magic"):
        pump(b"IHAVEOPX" + bytes(8), options())
    go = struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, 8) + struct.pack(">I", 10) + b"abcd"
    with pytest.raises(NbdProtocolError, match="runs past the end"):
        pump(go, options())
    meta = struct.pack(">QII", c.IHAVEOPT, c.OPT_SET_META_CONTEXT, 12) + bytes(4) + b"\0\0\0\x02"
    meta += bytes(4)
    with pytest.raises(NbdProtocolError, match="truncated before a string length"):
        pump(meta, options())
    with pytest.raises(NbdProtocolError, match="too long"):
        pump(struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, 1 << 30), options())
    with pytest.raises(NbdProtocolError, match="NUL"):
        pump(struct.pack(">QII", c.IHAVEOPT, c.OPT_EXPORT_NAME, 2) + b"a\0", options())

    _, server = handshake()
    with pytest.raises(NbdProtocolError, match="bad magic"):
        pump(bytes(28), server)
    _, server = handshake()
    big = struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1, 0, 1 << 30)
    with pytest.raises(NbdProtocolError, match="exceeds the maximum"):
        pump(big, server)
    _, server = handshake()
    assert (
        pump(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, 1, 0, 8) + b"abc", server)
        == []
    )
    with pytest.raises(NbdProtocolError, match="bytes of a message unsent"):
        pump(b"", server)


def test_disconnect_closes_both_sides() -> None:
    client, server = handshake()
    [req] = pump(client.send_disconnect(), server)
    assert isinstance(req, Request) and req.command == c.CMD_DISC
    assert client.state is ClientState.CLOSED and server.state is ServerState.CLOSED


def test_query_count_mismatch_and_replies_out_of_turn() -> None:
    server = ServerConnection()
    pump(struct.pack(">I", 1), server)
    body = (
        bytes(4) + struct.pack(">I", 1) + struct.pack(">I", 1) + b"a" + struct.pack(">I", 1) + b"b"
    )
    data = struct.pack(">QII", c.IHAVEOPT, c.OPT_SET_META_CONTEXT, len(body)) + body
    with pytest.raises(NbdProtocolError, match="1 queries do not match"):
        pump(data, server)
    with pytest.raises(NbdProtocolError, match="no option to reply to"):
        ServerConnection().reply_ack()
    with pytest.raises(NbdProtocolError, match="cannot send a request"):
        ClientConnection().send_request(c.CMD_READ, 0, 1)
    client, _ = handshake()
    client.send_request(c.CMD_READ, 0, 1, handle=5)
    with pytest.raises(NbdProtocolError, match="already in flight"):
        client.send_request(c.CMD_READ, 0, 1, handle=5)
