"""What a process may do and how it is scheduled, as far as the host agent must match it.

A command run by the agent has the agent's privileges, confinement and scheduling, not
its client's: a client with the same user id but fewer capabilities, a seccomp filter,
``no_new_privs``, other namespaces or root folder, another cgroup or security label, other
groups, or a lower CPU or I/O priority or narrower CPU affinity would get more through the
agent than it has. The agent serves only clients whose context equals its own; the others
run their commands themselves.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Callable
from pathlib import Path

__all__ = ["process_context"]

_STATUS_FIELDS = (
    "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
    "NoNewPrivs", "Seccomp", "Seccomp_filters",
)  # fmt: skip
_NAMESPACES = ("mnt", "pid", "net", "user", "ipc", "uts", "cgroup", "time")
_IOPRIO_GET = {"x86_64": 252, "aarch64": 31}
"""``ioprio_get``'s system call number (none in the standard library)."""
_IOPRIO_WHO_PROCESS = 1


def process_context(pid: int) -> dict[str, str]:
    """The context of process ``pid`` (see the module docstring); a value that cannot be
    read is recorded as such, so it only matches the same failure."""
    proc = Path(f"/proc/{pid}")
    context: dict[str, str] = {}
    status = _read(proc / "status")
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            context[key] = " ".join(value.split())
    for name in _NAMESPACES:
        context[f"ns:{name}"] = _readlink(proc / "ns" / name)
    context["root"] = _identity(proc / "root")
    context["cgroup"] = _read(proc / "cgroup")
    context["lsm"] = _read(proc / "attr" / "current")
    context["nice"] = _call(lambda: os.getpriority(os.PRIO_PROCESS, pid))
    context["affinity"] = _call(lambda: sorted(os.sched_getaffinity(pid)))
    context["ioprio"] = _call(lambda: _ioprio(pid))
    return context


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        return f"unreadable: {exc.errno}"


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError as exc:
        return f"unreadable: {exc.errno}"


def _identity(path: Path) -> str:
    try:
        info = path.stat()
    except OSError as exc:
        return f"unreadable: {exc.errno}"
    return f"{info.st_dev}:{info.st_ino}"


def _call(get: Callable[[], object]) -> str:
    try:
        return repr(get())
    except OSError as exc:
        return f"unreadable: {exc.errno}"


def _ioprio(pid: int) -> int | None:
    number = _IOPRIO_GET.get(platform.machine())
    if number is None:
        return None
    value = int(_libc().syscall(number, _IOPRIO_WHO_PROCESS, pid))
    if value < 0:
        raise OSError(ctypes.get_errno(), "ioprio_get")
    return value


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
