"""A synchronous QMP session on top of the asyncio ``qemu.qmp`` client.

The client runs on a private event loop in a daemon thread, so callers (threads,
or code that already runs an asyncio loop of its own) just call methods. Every
call has a timeout; failures become :class:`~stratavault.errors.SourceError`
naming the socket, the command and QEMU's message.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # imported when a session starts: asyncio and qemu.qmp cost ~10 MB
    from qemu.qmp import EventListener, QMPClient

from stratavault.errors import SourceError

__all__ = ["QmpSession"]

_T = TypeVar("_T")
_BACKLOG_EVENTS = 1000


class QmpSession:
    """One QMP connection to a QEMU process (or qemu-storage-daemon) over a unix socket.

    Use as a context manager, or call :meth:`close`. Methods are safe to call
    from several threads (one command at a time goes out).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout_s: float = 30.0,
        connected: socket.socket | None = None,
    ) -> None:
        """Connect to the QMP socket at ``socket_path``; or take over ``connected``, a
        socket already connected to QEMU's monitor (one end of a socket pair whose
        other end QEMU was started with), and ``socket_path`` only names it in messages."""
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self.peer_pid: int | None = None
        """Process id of the QEMU at the other end (SO_PEERCRED), when known."""
        self.greeting: dict[str, Any] = {}
        self._lock = threading.RLock()
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp {self.socket_path.name}", daemon=True
        )
        self._thread.start()
        self._client: QMPClient | None = None
        self._listener: EventListener | None = None
        self._backlog: collections.deque[dict[str, Any]] = collections.deque(maxlen=_BACKLOG_EVENTS)
        try:
            self._connect(connected if connected is not None else self._open_socket())
        except BaseException:
            self.close()
            raise

    # -- life cycle -------------------------------------------------------------------------

    def _open_socket(self) -> socket.socket:
        where = f"QMP socket {self.socket_path}"
        if not self.socket_path.exists():
            raise SourceError(f"connecting to {where} - no such socket (is the VM running?)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout_s)
            sock.connect(os.fspath(self.socket_path))
        except OSError as exc:
            sock.close()
            raise SourceError(
                f"connecting to {where} - {exc.strerror or exc} (is the VM running?)"
            ) from exc
        return sock

    def _connect(self, sock: socket.socket) -> None:
        """Negotiate QMP on the connected ``sock`` (closed on failure)."""
        where = f"QMP socket {self.socket_path}"
        self.peer_pid = _peer_pid(sock)

        async def connect() -> None:
            from qemu.qmp import EventListener, QMPClient

            client = QMPClient(f"stratavault:{self.socket_path.name}")
            listener = EventListener()
            client.register_listener(listener)
            self._client, self._listener = client, listener
            await client.connect(sock)

        try:
            self._run(connect(), what=f"connecting to {where}")
        finally:
            if self._client is None or self._client.greeting is None:
                sock.close()
        assert self._client is not None and self._client.greeting is not None
        self.greeting = dict(self._client.greeting._asdict())

    def close(self) -> None:
        """Disconnect; QEMU keeps running. Calling it twice is harmless."""
        with self._lock:
            client, self._client = self._client, None
            if client is not None and self._loop.is_running():
                from qemu.qmp import QMPError

                with contextlib.suppress(
                    QMPError, OSError, EOFError, concurrent.futures.TimeoutError
                ):
                    self._submit(client.disconnect()).result(timeout=5)
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> QmpSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- commands and events -----------------------------------------------------------------

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        An error reply raises SourceError naming the command and QEMU's message.
        """
        with self._lock:
            client = self._require_client(command)
            what = f"QMP command '{command}' on {self.socket_path}"
            return self._run(
                client.execute(command, dict(arguments) if arguments else None),
                what=what,
                timeout_s=timeout_s,
            )

    def wait_event(
        self,
        name: str,
        *,
        match: Mapping[str, object] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Wait for (and consume) the first event ``name`` whose data contains ``match``.

        Events that arrived since the connection and were not consumed yet count too.
        """
        want = dict(match or {})

        def fits(event: Mapping[str, Any]) -> bool:
            data = event.get("data") or {}
            return event.get("event") == name and all(data.get(k) == v for k, v in want.items())

        async def wait() -> dict[str, Any]:
            for event in list(self._backlog):
                if fits(event):
                    self._backlog.remove(event)
                    return event
            assert self._listener is not None
            while True:
                event = dict(await self._listener.get())
                if fits(event):
                    return event
                self._backlog.append(event)

        with self._lock:
            self._require_client(f"waiting for {name}")
            return self._run(
                wait(), what=f"waiting for QMP event {name} {want} on {self.socket_path}",
                timeout_s=timeout_s,
            )  # fmt: skip

    def drain_events(self) -> list[dict[str, Any]]:
        """Return and forget every event received and not consumed yet."""

        async def drain() -> list[dict[str, Any]]:
            events = list(self._backlog)
            self._backlog.clear()
            if self._listener is not None:
                events.extend(dict(e) for e in self._listener.clear())
            return events

        with self._lock:
            return self._run(drain(), what="reading QMP events")

    # -- plumbing ----------------------------------------------------------------------------

    def _require_client(self, what: str) -> QMPClient:
        if self._client is None:
            raise SourceError(f"{what} on QMP socket {self.socket_path} - session is closed")
        return self._client

    def _submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(
        self, coro: Coroutine[Any, Any, _T], *, what: str, timeout_s: float | None = None
    ) -> _T:
        import asyncio

        from qemu.qmp import ExecuteError, QMPError

        timeout = self.timeout_s if timeout_s is None else timeout_s
        # The timeout acts inside the loop, so a late coroutine is cancelled there, cleanly.
        future = self._submit(asyncio.wait_for(coro, timeout))
        try:
            return future.result(timeout=timeout + 5)
        except TimeoutError as exc:
            raise SourceError(f"{what} - no answer within {timeout:g} s") from exc
        except ExecuteError as exc:
            raise SourceError(f"{what} failed - {exc.error_class}: {exc}") from exc
        except (QMPError, OSError, EOFError) as exc:
            cause = str(exc) or type(exc).__name__
            raise SourceError(f"{what} - {cause} (did QEMU exit?)") from exc


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a connected unix socket."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None
