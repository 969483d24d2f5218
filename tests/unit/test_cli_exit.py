"""``exit_now``: the console script ends without the interpreter's teardown, yet as
``sys.exit`` would for everything a user or a caller can see."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from stratavault.cli import exit_now
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
if sys.argv[2] == "thread":
    def late():
        time.sleep(0.3)
        (out / "thread").write_text("done")
    threading.Thread(target=late).start()
if sys.argv[2] == "pipe":  # buffered output, then wait until the reader is gone
    sys.stdout.write("x")
    sys.stdin.read()
else:
    sys.stdout.write("x" * 1_000_000)  # buffered: only the flush at exit writes the rest
exit_now(int(sys.argv[3]))
"""


# Buffered output, as a user's shell gives it (this environment may turn buffering off).
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def _run(tmp_path: Path, mode: str, code: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), mode, str(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_ENV,
    )


def test_output_is_flushed_and_atexit_handlers_run(tmp_path: Path) -> None:
    proc = _run(tmp_path, "plain", 3)
    assert proc.returncode == 3
    assert proc.stdout == "x" * 1_000_000
    assert (tmp_path / "atexit").read_text() == "ran"


def test_a_running_thread_is_waited_for(tmp_path: Path) -> None:
    proc = _run(tmp_path, "thread", 0)
    assert proc.returncode == 0
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_output_into_a_closed_pipe_is_an_error(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), "pipe", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_ENV,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the output is flushed
    proc.stdin.close()
    assert proc.wait(timeout=60) == 120
