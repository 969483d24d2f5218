"""Broken peers: fake servers that die, stall or lie make the client raise quickly; clients
that misbehave get NBD errors or a closed connection while our server keeps serving."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stratavault.errors import NbdError, NbdProtocolError
from stratavault.nbd import (
    NEED_DATA,
    ClientConnection,
    ErrorChunk,
    FileBackend,
    NbdServer,
    OptionAck,
    OptionRequest,
    Request,
    ServerConnection,
    SimpleReply,
    connect,
    constants as c,
)

Behaviour = Callable[[socket.socket, ServerConnection, Request], None]


class FakeServer:
    """A tiny NBD server that does a correct handshake, then ``behaviour`` for a request."""

    def __init__(self, path: Path, behaviour: Behaviour, *, greet: bool = True) -> None:
        self.path, self.behaviour, self.greet = path, behaviour, greet
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        with sock:
            if self.greet:
                conn = ServerConnection()
                sock.sendall(conn.greeting())
                request = self._handshake(sock, conn)
                if request is not None:
                    self.behaviour(sock, conn, request)
            self.release.wait(10)

    def _handshake(self, sock: socket.socket, conn: ServerConnection) -> Request | None:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    return None
                conn.receive_data(data)
            elif isinstance(event, OptionRequest):
                if event.option == c.OPT_GO:
                    sock.sendall(conn.reply_info_export(1 << 20, c.FLAG_HAS_FLAGS))
                sock.sendall(conn.reply_ack())
            elif isinstance(event, Request):
                return event

    def close(self) -> None:
        self.release.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., FakeServer]]:
    made: list[FakeServer] = []

    def make(behaviour: Behaviour, *, greet: bool = True) -> FakeServer:
        server = FakeServer(tmp_path / f"fake{len(made)}.sock", behaviour, greet=greet)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def dies_mid_data(sock: socket.socket, conn: ServerConnection, req: Request) -> None:
    sock.sendall(conn.reply_data_header(req.handle, req.offset, req.length, done=True))
    sock.sendall(b"x" * (req.length // 2))
    sock.shutdown(socket.SHUT_RDWR)


def stalls_mid_header(sock: socket.socket, conn: ServerConnection, req: Request) -> None:
    sock.sendall(conn.reply_data_header(req.handle, req.offset, req.length, done=True)[:7])


def stays_silent(sock: socket.socket, conn: ServerConnection, req: Request) -> None:
    pass


def sends_garbage(sock: socket.socket, conn: ServerConnection, req: Request) -> None:
    sock.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def wrong_handle(sock: socket.socket, conn: ServerConnection, req: Request) -> None:
    sock.sendall(conn.reply_simple(req.handle + 1000))


def short_cover(sock: socket.socket, conn: ServerConnection, req: Request) -> None:
    sock.sendall(conn.reply_data_header(req.handle, req.offset, 10, done=True) + b"y" * 10)


@pytest.mark.parametrize(
    ("behaviour", "error", "words"),
    [
        (dies_mid_data, NbdProtocolError, "closed the connection with 1 request"),
        (stalls_mid_header, NbdError, "sent nothing for 0.5 s"),
        (stays_silent, NbdError, "sent nothing for 0.5 s"),
        (sends_garbage, NbdProtocolError, "bad magic"),
        (wrong_handle, NbdProtocolError, "matches no request"),
        (short_cover, NbdProtocolError, "covered 10 bytes"),
    ],
)
def test_broken_server_makes_the_client_raise_not_hang(
    fake: Callable[..., FakeServer], behaviour: Behaviour, error: type[Exception], words: str
) -> None:
    server = fake(behaviour)
    client = connect(server.path, "x", timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(error, match=words):
        client.read(0, 65536)
    assert time.monotonic() - start < 3
    with pytest.raises(NbdError, match="failed before"):
        client.read(0, 1)
    client.close()


def test_server_silent_in_handshake(fake: Callable[..., FakeServer]) -> None:
    server = fake(stays_silent, greet=False)
    start = time.monotonic()
    with pytest.raises(NbdError, match=r"handshake.*sent nothing"):
        connect(server.path, timeout_s=0.5)
    assert time.monotonic() - start < 3


# -- misbehaving clients against our server ---------------------------------------------------


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[NbdServer]:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x42" * 65536)
    server = NbdServer({"ro": FileBackend(disk)}, unix_path=tmp_path / "ours.sock")
    server.start()
    yield server
    server.close()


def raw_session(
    server: NbdServer, *, structured: bool = True
) -> tuple[socket.socket, ClientConnection]:
    """A socket in the transmission phase, driven by hand."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(server.address)
    conn = ClientConnection()
    recv_events(sock, conn, 1)
    sock.sendall(conn.send_client_flags())
    if structured:
        sock.sendall(conn.send_option(c.OPT_STRUCTURED_REPLY))
        assert isinstance(recv_events(sock, conn, 1)[0], OptionAck)
    sock.sendall(conn.send_go("ro"))
    assert isinstance(recv_events(sock, conn, 3)[-1], OptionAck)
    return sock, conn


def recv_events(sock: socket.socket, conn: ClientConnection, count: int) -> list[object]:
    events: list[object] = []
    while len(events) < count:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(sock.recv(65536))
        else:
            events.append(event)
    return events


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def still_serving(server: NbdServer) -> None:
    with connect(server.address, "ro", timeout_s=5) as client:
        assert client.read(0, 4) == b"\x42" * 4


def test_bad_greeting_reply_and_option_magic_close_the_connection(ours: NbdServer) -> None:
    for first in (struct.pack(">I", 0xFF00), struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8)):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(ours.address)
            sock.recv(18)
            sock.sendall(first)
            assert closed_by_server(sock)
    still_serving(ours)


def test_truncated_request_and_oversized_write(ours: NbdServer) -> None:
    sock, conn = raw_session(ours)
    _, header = conn.send_request(c.CMD_READ, 0, 4)
    sock.sendall(header[:10])
    sock.close()
    sock, conn = raw_session(ours)
    _, header = conn.send_request(c.CMD_WRITE, 0, 1 << 30)
    sock.sendall(header)
    assert closed_by_server(sock)
    sock.close()
    still_serving(ours)


def test_bad_requests_get_nbd_errors(ours: NbdServer) -> None:
    sock, conn = raw_session(ours)
    cases = [
        (c.CMD_READ, 65000, 1000, b"", c.EINVAL),  # past the end
        (c.CMD_WRITE, 0, 4, b"abcd", c.EPERM),  # read-only export
        (c.CMD_TRIM, 0, 4096, b"", c.EPERM),
        (c.CMD_BLOCK_STATUS, 0, 4096, b"", c.EINVAL),  # no context negotiated
        (99, 0, 0, b"", c.EINVAL),  # unknown command
    ]
    for command, offset, length, payload, expected in cases:
        handle, header = conn.send_request(command, offset, length)
        sock.sendall(header + payload)
        [event] = recv_events(sock, conn, 1)
        assert isinstance(event, ErrorChunk), event
        assert (event.handle, event.error) == (handle, expected)
    sock.close()
    sock, conn = raw_session(ours, structured=False)
    handle, header = conn.send_request(c.CMD_READ, 65535, 2)
    sock.sendall(header)
    assert recv_events(sock, conn, 1) == [SimpleReply(handle, True, c.EINVAL)]
    handle, header = conn.send_request(c.CMD_READ, 0, 3)
    sock.sendall(header)
    assert recv_events(sock, conn, 1) == [SimpleReply(handle, True, 0, b"BBB")]
    sock.close()
    still_serving(ours)


def test_unknown_export_and_option_are_refused(ours: NbdServer) -> None:
    with pytest.raises(NbdError, match="no export named 'nope'"):
        connect(ours.address, "nope", timeout_s=5)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(ours.address)
        conn = ClientConnection()
        recv_events(sock, conn, 1)
        sock.sendall(conn.send_client_flags() + conn.send_option(c.OPT_STARTTLS))
        [event] = recv_events(sock, conn, 1)
        assert getattr(event, "reply_type", None) == c.REP_ERR_UNSUP
    still_serving(ours)


def answers_backwards(sock: socket.socket, conn: ServerConnection, req: Request) -> None:
    """Wait for four requests in flight, then answer them last first, each in two chunks."""
    requests = [req]
    while len(requests) < 4:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, Request):
            requests.append(event)
    for r in reversed(requests):
        half = r.length // 2
        fill = bytes([r.offset // 4096 + 1]) * (r.length - half)
        sock.sendall(conn.reply_hole(r.handle, r.offset, half, done=False))
        sock.sendall(conn.reply_data_header(r.handle, r.offset + half, len(fill), done=True) + fill)


def test_client_pipelines_and_accepts_replies_out_of_order(
    fake: Callable[..., FakeServer],
) -> None:
    server = fake(answers_backwards)
    with connect(server.path, "x", timeout_s=2, in_flight=4, request_bytes=4096) as client:
        data = client.read(0, 4 * 4096)
    expected = b"".join(bytes(2048) + bytes([i + 1]) * 2048 for i in range(4))
    assert data == expected
