"""A client of qemu-guest-agent: JSON lines over the VM's agent channel (a unix socket).

The channel is a byte pipe into the guest that may hold stale bytes from an
earlier client, so every session starts with ``guest-sync-delimited``: the agent
answers with a 0xFF byte followed by the echoed id, and everything before that
is discarded.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from stratavault.errors import SourceError

__all__ = ["GuestAgent"]

_DELIMITER = b"\xff"


class GuestAgent:
    """A connection to qemu-guest-agent through the host end of its channel."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout_s: float = 5.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout_s)
            self._sock.connect(os.fspath(self.socket_path))
        except OSError as exc:
            self._sock.close()
            raise SourceError(
                f"connecting to the guest agent at {self.socket_path} - {exc.strerror or exc}"
            ) from exc
        try:
            self.sync()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection (the agent keeps running in the guest)."""
        self._sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def sync(self) -> None:
        """Resynchronise the stream: discard whatever precedes the answer to a fresh id."""
        token = random.randrange(1, 2**31)
        deadline = time.monotonic() + self.timeout_s
        self._send(_DELIMITER)  # resets a half-read command in the agent's parser
        self._send_command("guest-sync-delimited", {"id": token})
        while True:
            self._read_until(_DELIMITER, deadline, "guest-sync-delimited")
            reply = self._read_reply(deadline, "guest-sync-delimited")
            if reply.get("return") == token:
                return

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Run one agent command and return its ``return`` value."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        self._send_command(command, arguments)
        reply = self._read_reply(deadline, command)
        if "error" in reply:
            error = reply["error"]
            raise SourceError(
                f"guest agent command '{command}' at {self.socket_path} failed -"
                f" {error.get('class', '?')}: {error.get('desc', error)}"
            )
        return reply.get("return")

    def fsfreeze_freeze(self, *, timeout_s: float | None = None) -> int:
        """Freeze the guest's file systems; returns how many were frozen."""
        return int(self.execute("guest-fsfreeze-freeze", timeout_s=timeout_s))

    def fsfreeze_thaw(self, *, timeout_s: float | None = None) -> int:
        """Thaw the guest's file systems; returns how many were thawed."""
        return int(self.execute("guest-fsfreeze-thaw", timeout_s=timeout_s))

    def fsfreeze_status(self) -> str:
        """``"thawed"`` or ``"frozen"``."""
        return str(self.execute("guest-fsfreeze-status"))

    # -- plumbing ----------------------------------------------------------------------------

    def _send_command(self, command: str, arguments: dict[str, Any] | None) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(json.dumps(message).encode() + b"\n")

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise SourceError(
                f"writing to the guest agent at {self.socket_path} - {exc.strerror or exc}"
            ) from exc

    def _read_reply(self, deadline: float, command: str) -> dict[str, Any]:
        while True:
            line = self._read_until(b"\n", deadline, command)
            line = line.strip(_DELIMITER + b" \r\n")
            if not line:
                continue
            try:
                reply = json.loads(line)
            except ValueError as exc:
                raise SourceError(
                    f"reading the reply to '{command}' from the guest agent at"
                    f" {self.socket_path} - not JSON: {line[:80]!r}"
                ) from exc
            if isinstance(reply, dict) and ("return" in reply or "error" in reply):
                return reply

    def _read_until(self, separator: bytes, deadline: float, command: str) -> bytes:
        """Return the buffered bytes up to ``separator`` (consumed), reading as needed."""
        while separator not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SourceError(
                    f"waiting for the guest agent at {self.socket_path} to answer '{command}'"
                    " - no answer in time (is the agent running in the guest?)"
                )
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise SourceError(
                    f"reading from the guest agent at {self.socket_path} - {exc.strerror or exc}"
                ) from exc
            if not data:
                raise SourceError(
                    f"reading the reply to '{command}' from the guest agent at"
                    f" {self.socket_path} - connection closed"
                )
            self._buffer += data
        head, _, self._buffer = self._buffer.partition(separator)
        return head
