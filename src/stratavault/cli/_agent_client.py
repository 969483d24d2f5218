"""The client side of the host agent: hand a command to a running agent (``_agent``).

The console script comes here before it imports anything else of its own: with
``STRATAVAULT_AGENT`` set (to ``1`` for the default socket, or to a socket's path), the
command line, the environment, the working folder, the umask, the signals it ignores and
its inheritable file descriptors (standard streams, ``<(...)`` pipes) go to the agent,
which runs the command in a process forked from its warm one and answers with the exit
code. Ctrl-C, SIGTERM and SIGHUP are passed on. The command runs here as always when no
agent answers within a second, when the agent refuses (another user, another context or
another installation: see ``_agent``), and when this process has a controlling terminal
(a command from a terminal may prompt on it, or be stopped with Ctrl-Z; the agent's
commands have none): an agent can only make a command faster.

The wire format (a unix stream socket): ``request length (u32 big endian) || request
JSON``; the agent answers JSON lines: ``{"ready": PID}`` from the command's process (or
``{"refused": REASON}``), upon which the client sends one byte with its descriptors
(``SCM_RIGHTS``), and at the end ``{"exit": CODE}``. Meanwhile the client sends one byte
per signal to pass on.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_AGENT",
    "FORWARDED_SIGNALS",
    "IGNORABLE_SIGNALS",
    "PACKAGE_ROOT",
    "REQUEST_HEADER",
    "default_socket_path",
    "forward",
    "peer_credentials",
]

ENV_AGENT = "STRATAVAULT_AGENT"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
IGNORABLE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
"""The installation this code runs from: an agent of another one refuses."""
REQUEST_HEADER = struct.Struct(">I")
"""The request's length, before its JSON."""
_CONNECT_TIMEOUT_S = 1.0
_START_TIMEOUT_S = 5.0
"""How long the agent may take to start the command before it runs here instead."""


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/stratavault/agent.sock``, else ``/run/stratavault/agent.sock``
    for root and ``/tmp/stratavault-UID/agent.sock`` for other users."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "stratavault" / "agent.sock"
    uid = os.getuid()
    folder = Path("/run/stratavault") if uid == 0 else Path(f"/tmp/stratavault-{uid}")
    return folder / "agent.sock"


def socket_path_from_env() -> Path | None:
    """The agent socket ``STRATAVAULT_AGENT`` names (None: not set, or ``0``/empty)."""
    value = os.environ.get(ENV_AGENT, "")
    if value in ("", "0"):
        return None
    return default_socket_path() if value == "1" else Path(value)


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def _has_terminal() -> bool:
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def forward(argv: Sequence[str]) -> int | None:
    """Run ``argv`` in the agent ``STRATAVAULT_AGENT`` names and return its exit code;
    None when it is to run here instead (see the module docstring)."""
    path = socket_path_from_env()
    if path is None or "agent" in argv or _has_terminal():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(_CONNECT_TIMEOUT_S)
        sock.connect(os.fspath(path))
        if peer_credentials(sock)[1] != os.getuid():
            return None  # not ours: it must not see our environment
        fds = _send_request(sock, argv)
        return _wait(sock, path, fds)
    except OSError:  # no agent, or it did not start the command in time
        return None
    finally:
        sock.close()


def _inheritable_fds(exclude: int) -> list[int]:
    """The descriptors a command started here would have (standard streams, pipes of
    ``<(...)``), as the agent's command must have them too."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with suppress(OSError):
            if fd != exclude and (fd <= 2 or os.get_inheritable(fd)):
                fds.append(fd)
    return sorted(fds)


def _send_request(sock: socket.socket, argv: Sequence[str]) -> list[int]:
    """Send the request; return the descriptors it names (sent once the agent asks)."""
    umask = os.umask(0)
    os.umask(umask)
    fds = _inheritable_fds(sock.fileno())
    ignored = [int(s) for s in IGNORABLE_SIGNALS if signal.getsignal(s) == signal.SIG_IGN]
    request = {
        "argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask,
        "fds": fds, "ignored": ignored, "package": PACKAGE_ROOT,
    }  # fmt: skip
    body = json.dumps(request).encode()
    sock.sendall(REQUEST_HEADER.pack(len(body)) + body)
    return fds


def _wait(sock: socket.socket, path: Path, fds: list[int]) -> int | None:
    """Wait for the agent's process for the command, hand it the descriptors, then pass
    signals on until it answers with the exit code (None: refused, or no answer in time).
    The descriptors go only to a process that answered: sent with the request, they would
    wait in a stopped agent's queue, and a pipe of ours would stay open there."""
    replies = _lines(sock)
    sock.settimeout(_START_TIMEOUT_S)
    first = next(replies, None)
    if first is None or "ready" not in first:
        return None
    sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    sock.settimeout(None)

    def pass_on(signum: int, _frame: object) -> None:
        with suppress(OSError):
            sock.send(bytes([signum]))

    handled = [s for s in FORWARDED_SIGNALS if signal.getsignal(s) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, pass_on) for sig in handled}
    try:
        last = next(replies, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if last is None or "exit" not in last:
        print(
            f"stratavault: the agent at {path} ended the command without an exit code",
            file=sys.stderr,
        )
        return 1
    return int(last["exit"])


def _lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    """The agent's JSON replies, one per line, until it hangs up."""
    buffered = b""
    while True:
        while b"\n" not in buffered:
            data = sock.recv(4096)
            if not data:
                return
            buffered += data
        line, buffered = buffered.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            return
        if isinstance(reply, dict):
            yield reply
