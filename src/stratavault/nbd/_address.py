"""Where an NBD server listens: unix socket path, TCP host:port, nbd:// and nbd+unix:// URIs."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from stratavault.errors import NbdError, UsageError

DEFAULT_PORT = 10809


@dataclass(frozen=True)
class NbdAddress:
    """A server address; ``export`` is set when it came from a URI with a path."""

    unix_path: str | None = None
    host: str = ""
    port: int = DEFAULT_PORT
    export: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return self.unix_path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str | os.PathLike[str]) -> NbdAddress:
        """Parse ``/path`` (or a Path), ``unix:/path``, ``host:port``,
        ``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=/path``."""
        if not isinstance(text, str):
            return cls(unix_path=os.fspath(text))
        if text.startswith(("nbd://", "nbd+unix://")):
            return cls._parse_uri(text)
        if text.startswith("unix:"):
            return cls(unix_path=text[5:])
        if "/" in text or text.endswith(".sock"):
            return cls(unix_path=text)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"NBD address {text!r}: expected a socket path, HOST:PORT or a URI")
        return cls(host=host.strip("[]") or "127.0.0.1", port=int(port))

    @classmethod
    def _parse_uri(cls, text: str) -> NbdAddress:
        parts = urlsplit(text)
        export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
        if parts.scheme == "nbd+unix":
            sockets = parse_qs(parts.query).get("socket")
            if not sockets:
                raise UsageError(f"NBD URI {text!r}: nbd+unix needs ?socket=PATH")
            return cls(unix_path=sockets[0], export=export)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise UsageError(f"NBD URI {text!r}: bad port") from None
        return cls(host=parts.hostname or "127.0.0.1", port=port, export=export)

    def connect(self, timeout_s: float) -> socket.socket:
        """An open socket to the server, with ``timeout_s`` on every later operation."""
        try:
            if self.unix_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout_s)
                try:
                    sock.connect(self.unix_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise NbdError(f"connecting to NBD server {self}: no answer in {timeout_s} s") from None
        except OSError as exc:
            raise NbdError(f"connecting to NBD server {self}: {exc.strerror or exc}") from None
        return sock
