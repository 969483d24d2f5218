"""Output of commands: human text, ``--json`` documents, and progress reporters."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from stratavault.jobs import Progress, ProgressState

__all__ = [
    "JsonProgress",
    "Output",
    "format_bytes",
    "make_progress",
    "shows_progress",
]


def format_bytes(n: float) -> str:
    """Human-readable size in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x09: "\\t"}
"""Control characters of names, escaped: a newline in a name must not make two lines."""


def printable(text: str) -> str:
    """Show bytes of non-UTF-8 file names as ``\\xNN`` instead of failing to print, and
    control characters (a newline in a name) escaped; the backslash itself stays as is."""
    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return shown.translate(_CONTROL) if not shown.isprintable() else shown


class Output:
    """Where a command writes: text or JSON on stdout, warnings on stderr."""

    def __init__(self, *, json_mode: bool, quiet: bool, stream: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.stream = stream or sys.stdout

    def text(self, line: str = "") -> None:
        """Print a line for people (not in JSON mode, not when quiet)."""
        if not self.json_mode and not self.quiet:
            print(printable(line), file=self.stream)

    def data(self, document: Any) -> None:
        """Print a JSON document (JSON mode only)."""
        if self.json_mode:
            print(json.dumps(document, sort_keys=True), file=self.stream, flush=True)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """Print an aligned text table (not in JSON mode)."""
        if self.json_mode or self.quiet:
            return
        cells = [[printable(str(c)) for c in row] for row in rows]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
        print(line.rstrip(), file=self.stream)
        print("-" * len(line.rstrip()), file=self.stream)
        for row in cells:
            print(
                "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
                file=self.stream,
            )

    def warn(self, line: str) -> None:
        """A warning on stderr (also when quiet, never in the JSON stream)."""
        print(f"warning: {printable(line)}", file=sys.stderr)


class JsonProgress:
    """Progress as JSON lines on stdout, at most a few per second."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 0.5) -> None:
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self._last = 0.0

    def _emit(self, state: ProgressState, kind: str) -> None:
        doc = {
            "message_type": kind,
            "phase": state.phase,
            "files_done": state.files_done,
            "files_total": state.files_total,
            "bytes_done": state.bytes_done,
            "bytes_total": state.bytes_total,
            "errors": state.errors,
            "current": state.current,
            "seconds_elapsed": round(time.monotonic() - state.started, 3) if state.started else 0,
        }
        print(json.dumps(doc), file=self.stream, flush=True)

    def update(self, state: ProgressState) -> None:
        """Emit a status line if the interval has passed."""
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._emit(state, "status")

    def warn(self, text: str) -> None:
        """Emit an error line."""
        print(json.dumps({"message_type": "error", "error": text}), file=self.stream, flush=True)

    def done(self, state: ProgressState) -> None:
        """Emit the final status line of the phase."""
        self._emit(state, "status")


class BarProgress:
    """A progress bar on a terminal (bytes, files, throughput, ETA), drawn by rich."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress as RichProgress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TextColumn("{task.fields[files]} files"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task: Any = None
        self._phase = ""

    def update(self, state: ProgressState) -> None:
        """Redraw (rich throttles the refresh)."""
        files = f"{state.files_done}" + (
            f"/{state.files_total}" if state.files_total is not None else ""
        )
        if self._task is None:
            self._bar.start()
        if self._task is None or state.phase != self._phase:
            self._phase = state.phase
            self._task = self._bar.add_task(state.phase, total=state.bytes_total, files=files)
        self._bar.update(
            self._task, completed=state.bytes_done, total=state.bytes_total, files=files
        )

    def warn(self, text: str) -> None:
        """Print above the bar."""
        self._bar.console.print(f"[yellow]warning:[/yellow] {text}", highlight=False)

    def done(self, state: ProgressState) -> None:
        """Finish the bar."""
        self.update(state)
        self._bar.stop()
        self._task = None


def shows_progress(*, json_mode: bool, quiet: bool) -> bool:
    """Whether progress is shown (worth counting totals for an ETA)."""
    return not quiet and (json_mode or sys.stderr.isatty())


def make_progress(*, json_mode: bool, quiet: bool) -> Progress:
    """The progress reporter fitting the output mode and terminal."""
    if quiet:
        from stratavault.jobs import NullProgress

        return NullProgress()
    if json_mode:
        return JsonProgress()
    if sys.stderr.isatty():
        return BarProgress()
    return _WarningsOnly()


class _WarningsOnly:
    """Progress that shows only the warnings (stderr is not a terminal)."""

    def update(self, state: ProgressState) -> None:
        """Ignore."""

    def warn(self, text: str) -> None:
        """Print the warning on stderr."""
        print(f"warning: {text}", file=sys.stderr)

    def done(self, state: ProgressState) -> None:
        """Ignore."""
