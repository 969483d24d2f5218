from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stratavault.cli import run


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)

    def json_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


class Cli:
    """Runs ``stratavault`` in this process (fast) or as a real subprocess."""

    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.repo = tmp / "repo"
        self.password_file = tmp / "pass"
        self.password_file.write_text("correct horse battery staple\n")
        self.env = {
            "STRATAVAULT_REPOSITORY": str(self.repo),
            "STRATAVAULT_PASSWORD_FILE": str(self.password_file),
            "STRATAVAULT_CACHE_DIR": str(tmp / "cache"),
            "STRATAVAULT_INSECURE_FAST_KDF": "1",
        }
        self._capsys = capsys

    def __call__(self, *args: str | Path) -> Result:
        self._capsys.readouterr()
        saved = {k: os.environ.get(k) for k in self.env}
        sigterm = signal.getsignal(signal.SIGTERM)  # run() turns SIGTERM into Ctrl-C
        os.environ.update(self.env)
        try:
            code = run([str(a) for a in args])
        finally:
            signal.signal(signal.SIGTERM, sigterm)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        captured = self._capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def subprocess(
        self,
        *args: str | Path,
        env: dict[str, str] | None = None,
        as_user: str | None = None,
        detached: bool = False,
    ) -> Result:
        """Run the console script; ``detached``: in a session of its own, without a
        controlling terminal even when the tests have one (the host agent serves only
        such commands)."""
        full_env = {**os.environ, **self.env, **(env or {})}
        exe = Path(sys.executable).with_name("stratavault")
        prefix = []
        if as_user:
            prefix = ["setpriv", f"--reuid={as_user}", "--regid=nogroup", "--clear-groups"]
            full_env["HOME"] = "/nonexistent"
        proc = subprocess.run(
            [*prefix, str(exe), *map(str, args)],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            start_new_session=detached,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    yield Cli(tmp_path, capsys)
