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

Only clients of the agent's own user, with its own privileges, confinement and
scheduling (:mod:`._agent_context`), and from its own installation are served; the
socket's folder is ``0700``. Commands are independent processes: ending the agent does
not end them. An agent whose code changed on disk (an upgrade) refuses further commands,
which then run in their clients, and ends. The derivations it remembers are in its memory
and, while they run, in that of the commands it forked (copies made by ``fork``).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stratavault.cli._agent_client import (
    PACKAGE_ROOT,
    REQUEST_HEADER,
    peer_credentials,
)
from stratavault.cli._agent_command import (
    KEY_BYTES,
    MAX_FDS,
    CommandKeys,
    answer,
    run_command_here,
)
from stratavault.cli._agent_context import process_context
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

_RECORD = 2 * KEY_BYTES
"""A remembered derivation sent from a command to the agent: tag, then key."""
_MAX_REQUEST = 16 << 20
_REQUEST_DEADLINE_S = 2.0
"""A client sends its request as soon as it is connected: one that does not is dropped
after this long (the agent serves one connection at a time)."""


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
            self._keys[record[:KEY_BYTES]] = (record[KEY_BYTES:], self._clock() + self.ttl_s)

    def expire(self) -> None:
        """Forget what has expired."""
        now = self._clock()
        self._keys = {tag: kept for tag, kept in self._keys.items() if kept[1] > now}

    def __len__(self) -> int:
        return len(self._keys)


def code_fingerprint() -> str:
    """Names, sizes and times of this package's modules: changes when it is upgraded."""
    digest = hashlib.sha256()
    for path in sorted(Path(PACKAGE_ROOT).rglob("*.py")):
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
    agent = _Agent(KeyMemory(key_ttl_s), run_command, log)
    with _listening(socket_path) as listener, selectors.DefaultSelector() as sel:
        sel.register(listener, selectors.EVENT_READ)
        on_ready(socket_path)
        try:
            while agent.serving:
                for key, _ in sel.select(timeout=1):
                    if key.fileobj is listener:
                        agent.accept(listener, sel)
                    else:
                        agent.read_keys(sel, key.fd)
                agent.reap()
                agent.memory.expire()
        except KeyboardInterrupt:
            log("ending")
        agent.close()
    return 0


class _Agent:
    """The agent's state between commands."""

    def __init__(
        self, memory: KeyMemory, run_command: Callable[..., int], log: Callable[[str], None]
    ) -> None:
        self.memory, self.run_command, self.log = memory, run_command, log
        self.serving = True
        self.context = process_context(os.getpid())
        self.fingerprint = code_fingerprint()
        self.running: dict[int, socket.socket] = {}
        """Each command's process and the agent's end of its client's connection: a
        command killed by a signal cannot answer, the agent answers for it."""

    def accept(self, listener: socket.socket, sel: selectors.BaseSelector) -> None:
        """Take one connection and start its command (or refuse it); a bad request is
        logged and dropped, never the agent's end."""
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            conn.settimeout(_REQUEST_DEADLINE_S)
            refusal = self._refusal(conn)
            if refusal is None:
                request = _receive(conn, time.monotonic() + _REQUEST_DEADLINE_S)
                refusal = self._request_refusal(request)
            if refusal is not None:
                answer(conn, {"refused": refusal})
                self.log(f"refused a command: {refusal}")
                return
            self._start(conn, request, listener, sel)
        except Exception as exc:  # a client's bad request must never end the agent
            self.log(f"dropped a connection: {exc!r}")
        finally:
            conn.close()

    def _refusal(self, conn: socket.socket) -> str | None:
        pid, uid = peer_credentials(conn)
        if uid != os.getuid():
            return "another user"
        theirs = process_context(pid)
        differ = sorted(k for k in self.context if theirs.get(k) != self.context[k])
        return f"another context ({', '.join(differ)})" if differ else None

    def _request_refusal(self, request: dict[str, Any]) -> str | None:
        if request["package"] != PACKAGE_ROOT:
            return f"another installation ({request['package']})"
        if code_fingerprint() != self.fingerprint:
            self.serving = False
            return "the agent's code changed: it ends"
        return None

    def _start(
        self,
        conn: socket.socket,
        request: dict[str, Any],
        listener: socket.socket,
        sel: selectors.BaseSelector,
    ) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a command that outlives the agent must not keep its socket
            listener.close()
            os.close(read_end)
            run_command_here(conn, request, CommandKeys(self.memory, write_end), self.run_command)
        os.close(write_end)
        sel.register(read_end, selectors.EVENT_READ)
        self.running[pid] = conn.dup()
        self.log(f"{_words(request['argv'])} in process {pid}")

    def read_keys(self, sel: selectors.BaseSelector, fd: int) -> None:
        """Take the derivations a command sends; close its pipe once it has ended."""
        data = os.read(fd, 64 * _RECORD)
        for at in range(0, len(data) - _RECORD + 1, _RECORD):
            self.memory.store(data[at : at + _RECORD])
            ttl = self.memory.ttl_s
            self.log(f"remembering a key derivation for {ttl:g} s ({len(self.memory)} kept)")
        if not data:
            sel.unregister(fd)
            os.close(fd)

    def reap(self) -> None:
        """Collect ended commands; answer for one a signal killed (128 + its number)."""
        for pid in list(self.running):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            conn = self.running.pop(pid)
            if os.WIFSIGNALED(status):
                answer(conn, {"exit": 128 + os.WTERMSIG(status)})
            conn.close()

    def close(self) -> None:
        """Let go of the running commands' connections (they answer for themselves)."""
        for conn in self.running.values():
            conn.close()
        self.running.clear()


def _words(argv: list[str]) -> str:
    """The command's first words, for the log (never its arguments' values)."""
    return " ".join(word for word in argv[:3] if not word.startswith("-"))[:80]


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
    """A listening socket at ``path`` in a folder only its owner can enter; on the way
    out the socket is removed if it is still the one bound here."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise UsageError(
            f"agent: {folder} must belong to you and be closed to others (chmod 700 {folder})"
        )
    _remove_stale(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound: tuple[int, int] | None = None
    try:
        listener.bind(os.fspath(path))
        bound = _identity(path)
        os.chmod(path, 0o600)
        listener.listen(64)
        yield listener
    finally:
        listener.close()
        if bound is not None and _identity(path) == bound:
            with suppress(FileNotFoundError):
                path.unlink()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


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


def _receive(conn: socket.socket, deadline: float) -> dict[str, Any]:
    """The request (its descriptors come later, to the command's process)."""
    data = bytearray()
    length = None
    head = REQUEST_HEADER.size
    while length is None or len(data) < head + length:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        more = conn.recv(1 << 16)
        if not more:
            raise ValueError("the request was cut short")
        data += more
        if length is None and len(data) >= head:
            (length,) = REQUEST_HEADER.unpack_from(data)
            if length > _MAX_REQUEST:
                raise ValueError(f"a request of {length} bytes")
    return _checked(json.loads(data[head:]))


def _checked(request: object) -> dict[str, Any]:
    """``request`` if it has the shape the client sends, else ``ValueError``."""

    def strings(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    def numbers(value: object) -> bool:
        return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)

    ok = (
        isinstance(request, dict)
        and strings(request.get("argv"))
        and isinstance(request.get("env"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())
        and isinstance(request.get("cwd"), str)
        and type(request.get("umask")) is int
        and numbers(request.get("fds"))
        and len(request["fds"]) <= MAX_FDS
        and {0, 1, 2} <= set(request["fds"])
        and numbers(request.get("ignored"))
        and isinstance(request.get("package"), str)
    )
    if not ok:
        raise ValueError("not a request")
    return request  # type: ignore[return-value]
