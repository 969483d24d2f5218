"""Helper processes (workers, read-ahead, the walker) that must not outlive the backup."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
from collections.abc import Iterator
from multiprocessing.context import ForkContext
from pathlib import Path

__all__ = ["die_with_parent", "kill_process_tree", "shared_heap"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Make this (helper) process get SIGKILL when its parent process dies (Linux), and
    leave Ctrl-C to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux/glibc: the helper ends when its pipe or task queue closes
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def shared_heap() -> Iterator[ForkContext]:
    """The ``fork`` start method, for children forked inside the ``with`` block.

    A forked child shares the parent's memory until either writes to a page. The
    garbage collector writes to the header of every object it scans, so a child's
    full collections would copy the pages of every object it inherited (the two
    workers of a restore of the bench tree: ~12 MiB more together). Objects that
    exist now are frozen (``gc.freeze``) while the children are forked, so the
    children never scan them; the parent takes them back afterwards. The children
    must not rely on locks that other threads of the parent might hold (they run
    code of their own: walks, file readers, writers).
    """
    gc.freeze()
    try:
        yield multiprocessing.get_context("fork")
    finally:
        gc.unfreeze()


def kill_process_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and every process below it (found through /proc): a shell
    command's own children do not die with the shell."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        victim = todo.pop()
        todo.extend(children.get(victim, ()))
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)
