"""How a long job tells the outside world how far it got, and how it is cancelled."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

from stratavault.errors import Interrupted

__all__ = ["Cancellation", "NullProgress", "Progress", "ProgressState", "Ticker"]


@dataclass(slots=True)
class ProgressState:
    """A snapshot of a job's progress; totals are ``None`` while unknown."""

    phase: str
    files_done: int = 0
    files_total: int | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    errors: int = 0
    current: str = ""
    started: float = 0.0


class Progress(Protocol):
    """Receiver of progress; the CLI draws a bar or prints JSON lines."""

    def update(self, state: ProgressState) -> None:
        """Called often (the receiver throttles); ``state`` is reused, copy what you keep."""
        ...

    def warn(self, text: str) -> None:
        """A problem that does not stop the job (an unreadable file, a skipped entry)."""
        ...

    def done(self, state: ProgressState) -> None:
        """The phase ended; last state."""
        ...


class NullProgress:
    """Progress that goes nowhere."""

    def update(self, state: ProgressState) -> None:
        """Ignore."""

    def warn(self, text: str) -> None:
        """Ignore."""

    def done(self, state: ProgressState) -> None:
        """Ignore."""


class Cancellation:
    """A flag that a job checks between units of work (Ctrl-C sets it)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "interrupted"

    def cancel(self, reason: str = "interrupted") -> None:
        """Ask the job to stop at the next safe point."""
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """True once ``cancel`` was called."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise ``Interrupted`` if cancelled."""
        if self._event.is_set():
            raise Interrupted(f"{self.reason}; the repository is consistent")


def now() -> float:
    """Monotonic seconds, for durations."""
    return time.monotonic()


class Ticker:
    """Reports ``state`` every ``interval_s`` from a background thread while a job runs.

    Workers only update counters; the ticker is what the outside sees, so a job
    that waits for uploads still shows progress.
    """

    def __init__(self, progress: Progress, state: ProgressState, interval_s: float = 0.25) -> None:
        self._progress, self._state, self._interval_s = progress, state, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._progress.update(self._state)
