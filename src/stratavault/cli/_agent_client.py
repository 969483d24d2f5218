"""The client side of the host agent: hand a command to a running agent (``_agent``).

The console script comes here before it imports anything else of its own: with
``STRATAVAULT_AGENT`` set (to ``1`` for the default socket, or to a socket's path), the
command line, the environment, the working folder, the umask and the three standard
streams (as file descriptors) go to the agent, which runs the command in a process
forked from its warm one and answers with the exit code. Ctrl-C and SIGTERM/SIGHUP are
passed on. Without a usable agent (none listening, another owner, an agent started from
other code) the command runs here as always: an agent can only make a command faster.

The wire format (a unix stream socket, both ends checked to be the same user):
``request length (u32 big endian) || request JSON``, the descriptors of stdin, stdout and
stderr as ``SCM_RIGHTS`` with the first bytes; then the client sends one byte per signal
to pass on, and the agent answers one JSON line: ``{"exit": CODE}``, or
``{"refused": REASON}`` when the command should run in the client.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

__all__ = ["ENV_AGENT", "FORWARDED_SIGNALS", "default_socket_path", "forward", "peer_uid"]

ENV_AGENT = "STRATAVAULT_AGENT"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct(">I")


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


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def forward(argv: Sequence[str]) -> int | None:
    """Run ``argv`` in the agent ``STRATAVAULT_AGENT`` names and return its exit code;
    None when it is to run here (no agent set or reachable, or the agent refused)."""
    path = socket_path_from_env()
    if path is None or argv[:1] == ["agent"]:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(os.fspath(path))
        if peer_uid(sock) != os.getuid():
            return None  # not ours: it must not see our environment
        _send_request(sock, argv)
        return _wait(sock, path)
    except OSError:
        return None
    finally:
        sock.close()


def _send_request(sock: socket.socket, argv: Sequence[str]) -> None:
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps(
        {"argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask}
    ).encode()
    data = _HEADER.pack(len(request)) + request
    fds = array.array("i", [0, 1, 2])
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    sock.sendall(data[sent:])


def _wait(sock: socket.socket, path: Path) -> int | None:
    """Pass signals on until the agent answers; its exit code (None: refused)."""

    def pass_on(signum: int, _frame: object) -> None:
        with suppress(OSError):
            sock.send(bytes([signum]))

    previous = {sig: signal.signal(sig, pass_on) for sig in FORWARDED_SIGNALS}
    try:
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                data = sock.recv(4096)
            except InterruptedError:
                continue
            if not data:
                break
            reply += data
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        answer = json.loads(reply)
    except ValueError:
        print(
            f"stratavault: the agent at {path} ended the command without an exit code",
            file=sys.stderr,
        )
        return 1
    if "refused" in answer:
        return None
    return int(answer["exit"])
