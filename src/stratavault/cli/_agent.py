"""The host agent: a resident process that runs commands handed to it (``stratavault agent``).

A command started from scratch spends ~0.2 s before its work: the interpreter, ~600
modules and numpy's libraries (from disk when the page cache is cold), and Argon2id.
For a restore of what a dirty bitmap marks that is more than the work itself. The agent
loads the modules once and forks a process per command (``fork`` copies the loaded
interpreter in a millisecond); each command runs there with the client's command line,
environment, working folder, umask and standard streams, exactly as it would have run in
the client, and the client exits with its exit code (see :mod:`._agent_client`).

The agent also remembers, for ``--key-ttl`` seconds, the key derivations that opened a
key slot (:class:`~stratavault.repo.DerivedKeys`), so a command with the same passphrase
skips Argon2id: a derivation is a pure function of the slot's parameters, salt and the
passphrase, so a changed or removed slot is never opened by what it remembers. They are
kept in this process's memory only, under a tag (HMAC with a secret of this process), and
go when the agent ends.

Only the user that runs the agent is served (``SO_PEERCRED``); the socket's folder is
``0700``. Commands are independent processes: ending the agent does not end them. An
agent whose code changed on disk (an upgrade) refuses further commands, which then run in
their clients, and ends.
"""

from __future__ import annotations

import array
import hashlib
import hmac
import importlib
import io
import json
import os
import selectors
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from stratavault.cli._agent_client import FORWARDED_SIGNALS, peer_uid
from stratavault.errors import UsageError

if TYPE_CHECKING:
    from stratavault.repo import KdfParams

__all__ = ["KeyMemory", "serve"]

WARM_MODULES = (
    "numpy",
    "zstandard",
    "qemu.qmp",
    "stratavault.repo._repository",
    "stratavault.jobs._backup_files",
    "stratavault.jobs._backup_images",
    "stratavault.jobs._backup_vm",
    "stratavault.jobs._restore_files",
    "stratavault.jobs._restore_disk",
    "stratavault.jobs._restore_vm",
    "stratavault.jobs._prune",
    "stratavault.jobs._check",
)
"""Loaded before the first command (a module that cannot load is left to the command)."""

_KEY_BYTES = 32
_RECORD = 2 * _KEY_BYTES
"""A remembered derivation sent from a command to the agent: tag, then key."""
_MAX_REQUEST = 16 << 20
_HEADER_BYTES = 4


class KeyMemory:
    """Key derivations that opened a slot, kept ``ttl_s`` seconds (0: none kept)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._secret = os.urandom(32)
        self._keys: dict[bytes, tuple[bytes, float]] = {}

    def tag(self, kdf: KdfParams, salt: bytes, passphrase: bytes) -> bytes:
        """What a derivation is remembered under (its inputs never are)."""
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (json.dumps(kdf.to_json(), sort_keys=True).encode(), salt, passphrase):
            mac.update(len(part).to_bytes(8, "big") + part)
        return mac.digest()

    def lookup(self, tag: bytes) -> bytes | None:
        """The key remembered under ``tag``, unless it has expired."""
        found = self._keys.get(tag)
        if found is None or found[1] <= self._clock():
            return None
        return found[0]

    def store(self, record: bytes) -> None:
        """Remember a derivation sent by a command (a tag and a key)."""
        if self.ttl_s > 0 and len(record) == _RECORD:
            self._keys[record[:_KEY_BYTES]] = (record[_KEY_BYTES:], self._clock() + self.ttl_s)

    def expire(self) -> None:
        """Forget what has expired."""
        now = self._clock()
        self._keys = {tag: kept for tag, kept in self._keys.items() if kept[1] > now}

    def __len__(self) -> int:
        return len(self._keys)


class _CommandKeys:
    """The :class:`~stratavault.repo.DerivedKeys` of one command: the agent's memory as
    it was when the command was forked, and new derivations sent back through a pipe."""

    def __init__(self, memory: KeyMemory, pipe: int) -> None:
        self._memory, self._pipe = memory, pipe

    def get(self, kdf: KdfParams, salt: bytes, passphrase: bytes) -> bytes | None:
        return self._memory.lookup(self._memory.tag(kdf, salt, passphrase))

    def put(self, kdf: KdfParams, salt: bytes, passphrase: bytes, key: bytes) -> None:
        if self._memory.ttl_s > 0 and len(key) == _KEY_BYTES:
            with suppress(OSError):  # the agent has ended: nothing to remember for
                os.write(self._pipe, self._memory.tag(kdf, salt, passphrase) + key)


def code_fingerprint() -> str:
    """Names, sizes and times of this package's modules: changes when it is upgraded."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        info = path.stat()
        digest.update(f"{path}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def serve(
    socket_path: Path,
    *,
    key_ttl_s: float,
    run_command: Callable[..., int],
    on_ready: Callable[[Path], None],
    log: Callable[[str], None],
) -> int:
    """Listen on ``socket_path`` and run each command handed over with ``run_command(argv,
    derived_keys=...)`` in a forked process, until SIGINT or SIGTERM (exit 0) or until the
    code on disk changes (exit 0 too: a service manager starts the new one)."""
    for name in WARM_MODULES:
        with suppress(Exception):
            importlib.import_module(name)
    _wait_for_one_thread(log)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # commands are reaped by the kernel
    memory = KeyMemory(key_ttl_s)
    fingerprint = code_fingerprint()
    with _listening(socket_path) as listener, selectors.DefaultSelector() as sel:
        sel.register(listener, selectors.EVENT_READ)
        on_ready(socket_path)
        try:
            while True:
                for key, _ in sel.select(timeout=60):
                    if key.fileobj is listener:
                        if not _accept(listener, sel, memory, fingerprint, run_command, log):
                            log("the code on disk changed: ending (commands run without me)")
                            return 0
                    else:
                        _read_keys(sel, key.fd, memory, log)
                memory.expire()
        except KeyboardInterrupt:
            log("ending")
            return 0


def _wait_for_one_thread(log: Callable[[str], None]) -> None:
    """A process is forked only while it has one thread (a lock held by another thread
    would stay held in the child): wait for the start-up's helpers (read-ahead) to end."""
    deadline = time.monotonic() + 10
    while threading.active_count() > 1:
        if time.monotonic() > deadline:
            names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
            raise UsageError(f"agent: threads still running before serving: {names}")
        time.sleep(0.01)
    log(f"ready (pid {os.getpid()})")


@contextmanager
def _listening(path: Path) -> Iterator[socket.socket]:
    """A listening socket at ``path`` in a folder only its owner can enter."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise UsageError(
            f"agent: {folder} must belong to you and be closed to others (chmod 700 {folder})"
        )
    _remove_stale(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(os.fspath(path))
        os.chmod(path, 0o600)
        listener.listen(64)
        yield listener
    finally:
        listener.close()
        with suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()


def _remove_stale(path: Path) -> None:
    """Remove a socket no agent listens on; refuse one that is in use (or not a socket)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"agent: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise UsageError(f"agent: another agent is listening on {path}")


def _accept(
    listener: socket.socket,
    sel: selectors.BaseSelector,
    memory: KeyMemory,
    fingerprint: str,
    run_command: Callable[..., int],
    log: Callable[[str], None],
) -> bool:
    """Take one connection and fork its command; False when the code changed."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return True
    with conn:
        if peer_uid(conn) != os.getuid():
            log("refused a connection from another user")
            return True
        conn.settimeout(10)
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError) as exc:
            log(f"refused a malformed request: {exc}")
            return True
        try:
            if code_fingerprint() != fingerprint:
                _answer(conn, {"refused": "the agent's code changed"})
                return False
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # a command that outlives the agent must not keep its socket
                listener.close()
                os.close(read_end)
                _child(conn, fds, request, _CommandKeys(memory, write_end), run_command)
            os.close(write_end)
            sel.register(read_end, selectors.EVENT_READ)
            log(f"{' '.join(request['argv'][:2])} in process {pid}")
        finally:
            for fd in fds:
                os.close(fd)
    return True


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The request and the three descriptors that came with it."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = conn.recvmsg(
        1 << 16, socket.CMSG_SPACE(3 * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"{len(fds)} descriptors instead of 3")
    try:
        if len(data) < _HEADER_BYTES:
            raise ValueError("no request")
        length = int.from_bytes(data[:_HEADER_BYTES], "big")
        if length > _MAX_REQUEST:
            raise ValueError(f"a request of {length} bytes")
        body = bytearray(data[_HEADER_BYTES:])
        while len(body) < length:
            more = conn.recv(length - len(body))
            if not more:
                raise ValueError("the request was cut short")
            body += more
        request = json.loads(body)
        if not isinstance(request.get("argv"), list) or not isinstance(request.get("env"), dict):
            raise ValueError("the request has no argv or env")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, list(fds)


def _answer(conn: socket.socket, reply: dict[str, Any]) -> None:
    with suppress(OSError):
        conn.sendall(json.dumps(reply).encode() + b"\n")


def _read_keys(
    sel: selectors.BaseSelector, fd: int, memory: KeyMemory, log: Callable[[str], None]
) -> None:
    """Take the derivations a command sends; close its pipe once it has ended."""
    data = os.read(fd, 64 * _RECORD)
    for at in range(0, len(data) - _RECORD + 1, _RECORD):
        memory.store(data[at : at + _RECORD])
        log(f"remembering a key derivation for {memory.ttl_s:g} s ({len(memory)} kept)")
    if not data:
        sel.unregister(fd)
        os.close(fd)


def _child(
    conn: socket.socket,
    fds: list[int],
    request: dict[str, Any],
    keys: _CommandKeys,
    run_command: Callable[..., int],
) -> NoReturn:
    """In the forked process: become the client's command, run it, answer, end (never
    returns into the agent's code, whatever happens)."""
    code = 1
    finished = threading.Event()
    try:
        try:
            os.setsid()  # the agent's terminal and its signals are not the command's
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            _become_client(request)
            _pass_signals_on(conn, finished)
            code = run_command(request["argv"], derived_keys=keys)
        except KeyboardInterrupt:
            code = 130
        except BaseException as exc:  # the agent's own failure: say it where the user looks
            with suppress(Exception):
                print(f"stratavault: the agent could not run the command: {exc}", file=sys.stderr)
        finally:
            finished.set()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for stream in (sys.stdout, sys.stderr):
                with suppress(Exception):
                    stream.flush()
            _answer(conn, {"exit": code})
    finally:
        os._exit(0)


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
