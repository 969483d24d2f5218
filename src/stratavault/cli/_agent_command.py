"""The host agent's side of one command: the process forked for it (see ``_agent``).

It takes the client's descriptors, signals, folder, umask and environment, runs the
command, and answers with its exit code; it never returns into the agent's code.
"""

from __future__ import annotations

import array
import fcntl
import io
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from stratavault.cli import wind_up
from stratavault.cli._agent_client import FORWARDED_SIGNALS, IGNORABLE_SIGNALS

if TYPE_CHECKING:
    from stratavault.cli._agent import KeyMemory
    from stratavault.repo import KdfParams

__all__ = ["CommandKeys", "answer", "run_command_here"]

KEY_BYTES = 32
MAX_FDS = 250
_FDS_TIMEOUT_S = 2.0


class CommandKeys:
    """The :class:`~stratavault.repo.DerivedKeys` of one command: the agent's memory as
    it was when the command was forked, and new derivations sent back through a pipe."""

    def __init__(self, memory: KeyMemory, pipe: int) -> None:
        self._memory, self.pipe = memory, pipe

    def get(self, kdf: KdfParams, salt: bytes, passphrase: bytes) -> bytes | None:
        return self._memory.lookup(self._memory.tag(kdf, salt, passphrase))

    def put(self, kdf: KdfParams, salt: bytes, passphrase: bytes, key: bytes) -> None:
        if self._memory.ttl_s > 0 and len(key) == KEY_BYTES:
            with suppress(OSError):  # the agent has ended: nothing to remember for
                os.write(self.pipe, self._memory.tag(kdf, salt, passphrase) + key)


def _receive_fds(conn: socket.socket, count: int) -> list[int] | None:
    """The client's descriptors (None: it has gone, or sent something else)."""
    fds = array.array("i")
    conn.settimeout(_FDS_TIMEOUT_S)
    try:
        data, ancdata, _flags, _addr = conn.recvmsg(
            1, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
    except OSError:
        return None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if data != b"F" or len(fds) != count:
        return None
    return list(fds)


def answer(conn: socket.socket, reply: dict[str, Any]) -> None:
    """Send one JSON line to the client (gone: nothing to tell)."""
    with suppress(OSError):
        conn.sendall(json.dumps(reply).encode() + b"\n")


def run_command_here(
    conn: socket.socket,
    request: dict[str, Any],
    keys: CommandKeys,
    run_command: Callable[..., int],
) -> NoReturn:
    """In the forked process: take the client's descriptors, become its command, run it,
    answer, end (never returns into the agent's code, whatever happens)."""
    code = 1
    finished = threading.Event()
    try:
        answer(conn, {"ready": os.getpid()})
        fds = _receive_fds(conn, len(request["fds"]))
        if fds is None:  # the client gave up waiting, or went: run nothing
            os._exit(0)
        try:
            os.setsid()  # the agent's terminal and its signals are not the command's
            conn = _take_descriptors(conn, fds, request["fds"], keys)
            _take_signals(request["ignored"])
            _become_client(request)
            _pass_signals_on(conn, finished)
            code = run_command(request["argv"], derived_keys=keys)
        except KeyboardInterrupt:
            print("stratavault: interrupted", file=sys.stderr)
            code = 130
        except BaseException:  # as the interpreter would: a traceback, exit 1
            with suppress(Exception):
                traceback.print_exc()
            code = 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing may stop the answer now
            finished.set()
            for thread in threading.enumerate():  # as the interpreter's exit waits for them
                if not thread.daemon and thread is not threading.main_thread():
                    thread.join()
            answer(conn, {"exit": wind_up(code)})
    finally:
        os._exit(0)


def _take_descriptors(
    conn: socket.socket, fds: list[int], targets: list[int], keys: CommandKeys
) -> socket.socket:
    """Give the command the client's descriptors under the client's numbers and nothing
    of the agent's but its connection and key pipe (moved out of the way). Returns the
    connection's socket under its new number."""
    high = max(targets) + 1
    # Detached first: the old socket object, when collected, must not close its number,
    # which may be one of the client's by then.
    keep_conn = fcntl.fcntl(conn.detach(), fcntl.F_DUPFD_CLOEXEC, high)
    keys.pipe = fcntl.fcntl(keys.pipe, fcntl.F_DUPFD_CLOEXEC, high)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high) for fd in fds]
    keep = {keep_conn, keys.pipe, *moved}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with suppress(OSError):
                os.close(fd)
    for source, target in zip(moved, targets, strict=True):
        os.dup2(source, target)  # inheritable, as in the client
        os.close(source)
    return socket.socket(fileno=keep_conn)


def _take_signals(ignored: list[int]) -> None:
    """The agent's dispositions reset, and the signals the client ignores ignored."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for sig in IGNORABLE_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in ignored:
        if number in IGNORABLE_SIGNALS:
            signal.signal(number, signal.SIG_IGN)


def _become_client(request: dict[str, Any]) -> None:
    """The client's working folder, umask, environment and standard streams."""
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    tempfile.tempdir = None  # found again from this environment's TMPDIR
    time.tzset()
    sys.stdin = _stream(sys.stdin, 0, "r")
    sys.stdout = _stream(sys.stdout, 1, "w")
    sys.stderr = _stream(sys.stderr, 2, "w")


def _stream(like: TextIO, fd: int, mode: str) -> TextIO:
    """A text stream on ``fd`` as the interpreter makes one at start-up: buffered,
    line-buffered on a terminal (stderr always), with ``like``'s encoding and errors."""
    opened = open(fd, mode, encoding=like.encoding, errors=like.errors, closefd=False)  # noqa: SIM115
    stream = cast(io.TextIOWrapper, opened)
    if fd == 2 or (mode == "w" and os.isatty(fd)):
        stream.reconfigure(line_buffering=True)
    return stream


def _pass_signals_on(conn: socket.socket, finished: threading.Event) -> None:
    """A thread that turns each signal the client passes on, and the client's end (EOF),
    into SIGINT here (the command stops as it does on Ctrl-C), until ``finished``."""

    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:  # to the main thread itself: a wait there must wake up (EINTR)
        conn.settimeout(None)
        while not finished.is_set():
            try:
                data = conn.recv(64)
            except OSError:
                data = b""
            if finished.is_set():
                return
            if not data or any(sig in FORWARDED_SIGNALS for sig in data):
                signal.pthread_kill(main, signal.SIGINT)
            if not data:
                return

    threading.Thread(target=watch, name="client-signals", daemon=True).start()
