"""Waiting for a server's unix socket: the file appears when the server binds it, a moment
before it listens, so a connection tried then is refused. Wait for one that is accepted."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """Wait until the unix socket ``path`` of ``proc`` accepts connections; fail the test
    when ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited: {proc.stderr.read() if proc.stderr else ''!r}"
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise AssertionError(f"{path} never accepted connections")
