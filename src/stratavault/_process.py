"""Helper processes (workers, read-ahead, the walker) that must not outlive the backup."""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent"]

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
