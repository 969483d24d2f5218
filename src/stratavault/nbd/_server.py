"""A threaded NBD server: named exports backed by ExportBackend objects, one thread per client."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from stratavault.errors import NbdError, StratavaultError
from stratavault.nbd import _constants as c, _events as ev
from stratavault.nbd._backend import ExportBackend
from stratavault.nbd._server_protocol import ServerConnection, ServerState

log = logging.getLogger(__name__)

_ZERO_BLOCK = bytes(1 << 20)  # a read is compared with it piece by piece


def _all_zero(data: bytes) -> bool:
    """Whether ``data`` holds only zero bytes (memcmp speed, no buffer as large as a read)."""
    view = memoryview(data)
    step = len(_ZERO_BLOCK)
    return all(_ZERO_BLOCK.startswith(view[i : i + step]) for i in range(0, len(view), step))


_ERRNO_TO_NBD = {
    errno.EPERM: c.EPERM,
    errno.EACCES: c.EPERM,
    errno.EROFS: c.EPERM,
    errno.ENOSPC: c.ENOSPC,
    errno.EDQUOT: c.ENOSPC,
    errno.ENOMEM: c.ENOMEM,
    errno.EINVAL: c.EINVAL,
    errno.EOPNOTSUPP: c.ENOTSUP,
}
_CONTEXT_ID = 1  # the id of base:allocation, the one context served
_HANDSHAKE_TIMEOUT_S = 30.0


class NbdServer:
    """Serves ``exports`` (name -> backend) over a unix socket or TCP until closed.

    ``start()`` returns once the server listens; ``address`` (a path or ``host:port``) and
    ``uri(export)`` say where. Each client gets a thread that reads its requests; ``workers``
    threads shared by all clients run them, so a client's requests may complete out of order
    (at most ``2 * workers`` in flight per client; ``workers=1`` runs them one by one, in
    order). A client that breaks the protocol loses its connection, never the server.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportBackend],
        *,
        unix_path: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_payload: int = c.DEFAULT_MAX_PAYLOAD,
        workers: int = 4,
    ) -> None:
        self.exports = dict(exports)
        self.workers = max(1, workers)
        self.pool: ThreadPoolExecutor | None = None
        self.max_payload = max_payload
        self._unix_path = Path(unix_path) if unix_path is not None else None
        self._host, self._port = host, port
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.address = ""

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def uri(self, export: str = "") -> str:
        """An nbd:// or nbd+unix:// URI of an export of this server."""
        if self._unix_path is not None:
            return f"nbd+unix:///{quote(export)}?socket={self._unix_path}"
        return f"nbd://{self.address}/{quote(export)}"

    def start(self) -> None:
        """Listen and accept clients in a background thread."""
        if self._unix_path is not None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()
            listener.bind(str(self._unix_path))
            self.address = str(self._unix_path)
        else:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            listener = socket.create_server((self._host, self._port), family=family)
            host, port = listener.getsockname()[:2]
            self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if self.workers > 1:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nbd-worker")
        listener.listen(16)
        listener.settimeout(0.2)
        self._listener = listener
        self._spawn(self._accept_loop, "nbd-accept")

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=self._run_thread, args=(target, *args), name=name)
        thread.daemon = True
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run_thread(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._clients.add(sock)
            self._spawn(self._serve_client, "nbd-client", sock)

    def close(self) -> None:
        """Stop accepting, drop every client, wait for the threads."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            clients, threads = list(self._clients), list(self._threads)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()

    def _serve_client(self, sock: socket.socket) -> None:
        try:
            _ClientSession(self, sock).run()
        except (NbdError, OSError) as exc:
            log.info("NBD client dropped: %s", exc)
        except Exception:
            log.exception("NBD client session failed")
        finally:
            with self._lock:
                self._clients.discard(sock)
            sock.close()


class _ClientSession:
    """One client connection: handshake, then requests (run by the server's workers)."""

    def __init__(self, server: NbdServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.conn = ServerConnection(max_payload=server.max_payload)
        self.export_name = ""
        self.backend: ExportBackend | None = None
        self.context_export: str | None = None  # the export base:allocation was set for
        self._send_lock = threading.Lock()
        self._idle = threading.Condition()
        self._outstanding = 0

    def run(self) -> None:
        self.sock.settimeout(_HANDSHAKE_TIMEOUT_S)
        self.sock.sendall(self.conn.greeting())
        try:
            self._loop()
        finally:
            self._drain()

    def _loop(self) -> None:
        while self.conn.state is not ServerState.CLOSED:
            event = self.conn.next_event()
            if event is ev.NEED_DATA:
                data = self.sock.recv(1 << 20)
                self.conn.receive_data(data)
            elif isinstance(event, ev.OptionRequest):
                self._option(event)
                if self.conn.state is ServerState.TRANSMISSION:
                    self.sock.settimeout(None)
            elif isinstance(event, ev.Request):
                self._request(event)

    # -- options -------------------------------------------------------------------------------
    def _send(self, *parts: bytes) -> None:
        with self._send_lock:
            for part in parts:
                self.sock.sendall(part)

    def _option(self, req: ev.OptionRequest) -> None:
        conn, opt = self.conn, req.option
        if opt in (c.OPT_GO, c.OPT_INFO, c.OPT_EXPORT_NAME):
            self._go(req)
        elif opt == c.OPT_LIST:
            for name in self.server.exports:
                self._send(conn.reply_server(name))
            self._send(conn.reply_ack())
        elif opt == c.OPT_STRUCTURED_REPLY:
            self._send(conn.reply_ack())
        elif opt in (c.OPT_SET_META_CONTEXT, c.OPT_LIST_META_CONTEXT):
            self._meta_context(req)
        elif opt == c.OPT_ABORT:
            self._send(conn.reply_ack())
        else:
            self._send(conn.reply_error(c.REP_ERR_UNSUP, f"option {opt} is not supported"))

    def _go(self, req: ev.OptionRequest) -> None:
        backend = self.server.exports.get(req.export_name)
        if backend is None:
            if req.option == c.OPT_EXPORT_NAME:
                raise NbdError(f"NBD client asked for unknown export {req.export_name!r}")
            msg = f"no export named {req.export_name!r}"
            self._send(self.conn.reply_error(c.REP_ERR_UNKNOWN, msg))
            return
        flags = c.FLAG_HAS_FLAGS | c.FLAG_SEND_FLUSH | c.FLAG_SEND_FUA
        flags |= (
            c.FLAG_READ_ONLY if backend.read_only else c.FLAG_SEND_TRIM | c.FLAG_SEND_WRITE_ZEROES
        )
        if req.option == c.OPT_EXPORT_NAME:
            self._send(self.conn.reply_export_name(backend.size_bytes, flags))
        else:
            self._send(
                self.conn.reply_info_export(backend.size_bytes, flags),
                self.conn.reply_info_block_size(1, 4096, self.server.max_payload),
                self.conn.reply_ack(),
            )
            if req.option == c.OPT_INFO:
                return
        self.backend, self.export_name = backend, req.export_name
        if self.context_export != req.export_name:
            self.context_export = None

    def _meta_context(self, req: ev.OptionRequest) -> None:
        conn = self.conn
        if not conn.structured_replies:
            self._send(conn.reply_error(c.REP_ERR_INVALID, "structured replies not negotiated"))
            return
        if req.export_name not in self.server.exports:
            self._send(conn.reply_error(c.REP_ERR_UNKNOWN, f"no export {req.export_name!r}"))
            return
        listing = req.option == c.OPT_LIST_META_CONTEXT
        wanted = any(q in ("base:", c.CONTEXT_BASE_ALLOCATION) for q in req.queries) or (
            listing and not req.queries
        )
        if not listing:
            self.context_export = req.export_name if wanted else None
        if wanted:
            self._send(conn.reply_meta_context(_CONTEXT_ID, c.CONTEXT_BASE_ALLOCATION))
        self._send(conn.reply_ack())

    # -- requests ------------------------------------------------------------------------------
    def _request(self, req: ev.Request) -> None:
        pool = self.server.pool
        if req.command == c.CMD_DISC:
            return  # run() waits for the requests in flight
        if pool is None:
            self._serve(req)
            return
        if req.command == c.CMD_FLUSH:
            self._drain()  # every write received before the flush is covered by it
        with self._idle:
            while self._outstanding >= 2 * self.server.workers:
                self._idle.wait()
            self._outstanding += 1
        pool.submit(self._in_worker, req)

    def _in_worker(self, req: ev.Request) -> None:
        try:
            self._serve(req)
        except OSError as exc:
            log.info("NBD export %r: reply lost, client gone: %s", self.export_name, exc)
        except Exception:
            log.exception("NBD export %r: request %d failed", self.export_name, req.command)
        finally:
            with self._idle:
                self._outstanding -= 1
                self._idle.notify_all()

    def _drain(self) -> None:
        with self._idle:
            while self._outstanding:
                self._idle.wait()

    def _serve(self, req: ev.Request) -> None:
        backend = self.backend
        assert backend is not None
        error, message = self._check(req, backend)
        if error:
            self._send(self.conn.reply_error_chunk(req.handle, error, message))
            return
        try:
            self._perform(req, backend)
        except (OSError, StratavaultError) as exc:
            code = _ERRNO_TO_NBD.get(getattr(exc, "errno", None) or 0, c.EIO)
            log.warning("NBD export %r: request %d failed: %s", self.export_name, req.command, exc)
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._send(self.conn.reply_error_chunk(req.handle, code, message))
        except Exception as exc:  # a bug in a backend costs this request, not the server
            log.exception("NBD export %r: request %d failed", self.export_name, req.command)
            message = f"internal error: {type(exc).__name__}"
            self._send(self.conn.reply_error_chunk(req.handle, c.EIO, message))

    def _check(self, req: ev.Request, backend: ExportBackend) -> tuple[int, str]:
        cmd = req.command
        if cmd not in (
            c.CMD_READ,
            c.CMD_WRITE,
            c.CMD_FLUSH,
            c.CMD_TRIM,
            c.CMD_WRITE_ZEROES,
            c.CMD_BLOCK_STATUS,
        ):
            return c.EINVAL, f"command {cmd} is not supported"
        writes = cmd in (c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES)
        if writes and backend.read_only:
            return c.EPERM, f"export {self.export_name!r} is read-only"
        if cmd != c.CMD_FLUSH and req.offset + req.length > backend.size_bytes:
            error = c.ENOSPC if writes else c.EINVAL
            return error, f"range [{req.offset}, +{req.length}) beyond {backend.size_bytes} bytes"
        if cmd == c.CMD_READ and req.length > self.server.max_payload:
            return c.EINVAL, f"read of {req.length} bytes exceeds {self.server.max_payload}"
        if cmd == c.CMD_BLOCK_STATUS and (
            self.context_export != self.export_name or not self.conn.structured_replies
        ):
            return c.EINVAL, "no metadata context was negotiated"
        if cmd == c.CMD_BLOCK_STATUS and req.length == 0:
            return c.EINVAL, "block status of length 0"
        return 0, ""

    def _perform(self, req: ev.Request, backend: ExportBackend) -> None:
        conn, cmd, handle = self.conn, req.command, req.handle
        if cmd == c.CMD_READ:
            self._read(req, backend)
            return
        if cmd == c.CMD_BLOCK_STATUS:
            extents = backend.block_status(req.offset, req.length)
            if not extents:
                raise NbdError(f"block status of export {self.export_name!r} found no extent")
            if req.flags & c.CMD_FLAG_REQ_ONE:
                extents = extents[:1]
            self._send(conn.reply_block_status(handle, _CONTEXT_ID, extents, done=True))
            return
        if cmd == c.CMD_WRITE:
            backend.write(req.offset, req.data)
        elif cmd == c.CMD_TRIM:
            backend.trim(req.offset, req.length)
        elif cmd == c.CMD_WRITE_ZEROES:
            backend.zero(req.offset, req.length, no_hole=bool(req.flags & c.CMD_FLAG_NO_HOLE))
        if cmd == c.CMD_FLUSH or req.flags & c.CMD_FLAG_FUA:
            backend.flush()
        self._send(conn.reply_simple(handle))

    def _read(self, req: ev.Request, backend: ExportBackend) -> None:
        data = backend.read(req.offset, req.length) if req.length else b""
        if len(data) != req.length:
            raise NbdError(
                f"export {self.export_name!r} returned {len(data)} bytes for a read of {req.length}"
            )
        if not self.conn.structured_replies:
            self._send(self.conn.reply_simple(req.handle), data)
        elif not req.length:
            self._send(self.conn.reply_done(req.handle))
        elif req.length and _all_zero(data):
            self._send(self.conn.reply_hole(req.handle, req.offset, req.length, done=True))
        else:
            header = self.conn.reply_data_header(req.handle, req.offset, len(data), done=True)
            self._send(header, data)
