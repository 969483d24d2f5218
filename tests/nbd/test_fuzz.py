"""Mutated and truncated byte streams: the state machines raise NbdProtocolError or carry on,
never another exception (struct.error, IndexError, UnicodeDecodeError, KeyError...)."""

from __future__ import annotations

import random
from collections.abc import Callable

from stratavault.errors import NbdProtocolError
from stratavault.nbd import NEED_DATA, PAUSED, ClientConnection, ServerConnection, constants as c


def server_stream() -> tuple[bytes, list[tuple[int, int, int]]]:
    """What a server sends for a handshake and replies to three requests, and the requests."""
    s = ServerConnection()
    out = s.greeting()
    s.receive_data((3).to_bytes(4, "big"))
    s.next_event()

    def option(opt: int, data: bytes = b"") -> None:
        s.receive_data(b"IHAVEOPT" + opt.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data)
        s.next_event()

    option(c.OPT_STRUCTURED_REPLY)
    out += s.reply_ack()
    option(c.OPT_SET_META_CONTEXT, bytes(8))
    out += s.reply_meta_context(1, "base:allocation") + s.reply_ack()
    option(c.OPT_GO, bytes(6))
    out += s.reply_info_export(1 << 20, 1) + s.reply_info_block_size(1, 4096, 1 << 25)
    out += s.reply_ack()
    out += s.reply_data_header(1, 0, 32, done=False) + bytes(range(32))
    out += s.reply_hole(1, 32, 32, done=True)
    out += s.reply_block_status(2, 1, [(1024, 3), (3072, 0)], done=True)
    out += s.reply_error_chunk(3, c.EPERM, "read-only")
    requests = [(c.CMD_READ, 0, 64), (c.CMD_BLOCK_STATUS, 0, 4096), (c.CMD_WRITE, 0, 4)]
    return out, requests


def client_stream() -> bytes:
    """What a client sends: flags, options, requests with a write payload, disconnect."""
    cl = ClientConnection()
    cl.receive_data(ServerConnection().greeting())
    cl.next_event()
    out = cl.send_client_flags()
    out += cl.send_option(c.OPT_STRUCTURED_REPLY)
    cl.state = type(cl.state).OPTIONS
    out += cl.send_meta_context("disk", ["base:allocation", "qemu:dirty-bitmap:b"], list_=False)
    cl.state = type(cl.state).OPTIONS
    out += cl.send_go("disk")
    cl.state = type(cl.state).TRANSMISSION
    out += cl.send_request(c.CMD_READ, 0, 512)[1]
    out += cl.send_request(c.CMD_WRITE, 512, 5)[1] + b"hello"
    out += cl.send_request(c.CMD_BLOCK_STATUS, 0, 1 << 20, flags=c.CMD_FLAG_REQ_ONE)[1]
    return out + cl.send_disconnect()


def feed_client(data: bytes, requests: list[tuple[int, int, int]], rng: random.Random) -> None:
    cl = ClientConnection()
    pos = 0
    while pos <= len(data):
        step = rng.randint(1, 64)
        cl.receive_data(data[pos : pos + step] or b"")
        pos += step
        while (event := cl.next_event()) is not NEED_DATA:
            name = type(event).__name__
            if name == "ServerGreeting":
                cl.send_client_flags()
                cl.send_option(c.OPT_STRUCTURED_REPLY)
            elif name == "OptionAck" and cl.state.value == "options":
                if (
                    not cl.structured_replies
                    or getattr(event, "option", 0) == c.OPT_SET_META_CONTEXT
                ):
                    cl.send_go("")
                else:
                    cl.send_meta_context("", ["base:allocation"], list_=False)
            elif name == "OptionAck" and cl.state.value == "transmission":
                for command, offset, length in requests:
                    cl.send_request(command, offset, length)
            elif name == "OptionError":
                return


def feed_server(data: bytes, rng: random.Random) -> None:
    s = ServerConnection()
    pos = 0
    while pos <= len(data):
        step = rng.randint(1, 64)
        s.receive_data(data[pos : pos + step] or b"")
        pos += step
        while (event := s.next_event()) is not NEED_DATA:
            if event is PAUSED:
                s.reply_ack()
                continue


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(3)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:
        del buf[rng.randrange(len(buf)) :]
    else:
        at = rng.randrange(len(buf))
        buf[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(buf)


def single_byte_variants(data: bytes) -> list[bytes]:
    """Every truncation, and every byte set to 0, 1, 0xff and its neighbours."""
    variants = [data[:n] for n in range(len(data))]
    for at, value in enumerate(data):
        for new in {0, 1, 0xFF, (value + 1) % 256, (value - 1) % 256} - {value}:
            variants.append(data[:at] + bytes([new]) + data[at + 1 :])
    return variants


def run_feed(feed: Callable[[], None], outcomes: dict[str, int]) -> None:
    try:
        feed()
        outcomes["ok"] += 1
    except NbdProtocolError:
        outcomes["protocol error"] += 1


def test_every_single_byte_change_is_handled() -> None:
    rng = random.Random(7)
    server_bytes, requests = server_stream()
    client_bytes = client_stream()
    feed_client(server_bytes, requests, rng)  # the unmutated streams are accepted
    feed_server(client_bytes, rng)
    outcomes = {"ok": 0, "protocol error": 0}
    for variant in single_byte_variants(server_bytes):
        run_feed(lambda v=variant: feed_client(v, requests, rng), outcomes)
    for variant in single_byte_variants(client_bytes):
        run_feed(lambda v=variant: feed_server(v, rng), outcomes)
    assert outcomes["protocol error"] > 1000, outcomes


def test_random_mutations_only_raise_protocol_errors() -> None:
    rng = random.Random(20261125)
    server_bytes, requests = server_stream()
    client_bytes = client_stream()
    outcomes = {"ok": 0, "protocol error": 0}
    for _ in range(2000):
        run_feed(lambda: feed_client(mutate(server_bytes, rng), requests, rng), outcomes)
        run_feed(lambda: feed_server(mutate(client_bytes, rng), rng), outcomes)
    assert outcomes["protocol error"] > 1000, outcomes
