"""Shared pytest set-up.

Marker ``infra``: the test needs real infrastructure (QEMU, an S3 server, a browser, root...)
and may skip itself when it is absent. Under CI (``--require-all`` or the environment variable
``STRATAVAULT_REQUIRE_ALL=1``, which ``scripts/test.sh`` sets when ``CI=true``) such a skip is
reported as a failure, so that a green run means the real thing was exercised.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from pathlib import Path

import pytest

from tests.guest.fixtures import make_guest, running_guest, test_guest_image  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.s3server"]  # the s3_server fixture: a real SeaweedFS per worker


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-all",
        action="store_true",
        default=False,
        help="fail instead of skipping tests marked 'infra' (also: STRATAVAULT_REQUIRE_ALL=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "infra(what): needs real infrastructure; a skip fails under --require-all / CI",
    )
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # Started as a background job of a non-interactive shell (`cmd &`): Ctrl-C is
        # ignored, and every command the tests start would inherit that, so the tests
        # that press Ctrl-C on one would fail. Python's own handler is reset by exec.
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _require_all(config: pytest.Config) -> bool:
    return bool(config.getoption("--require-all")) or os.environ.get(
        "STRATAVAULT_REQUIRE_ALL", ""
    ) not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("infra")
    if marker is None or not report.skipped or not _require_all(item.config):
        return
    if hasattr(report, "wasxfail"):
        return
    what = ", ".join(str(a) for a in marker.args) or "infrastructure"
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"skip of a test that needs real {what} is a failure under --require-all / CI: {reason}"
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project's checkout (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(autouse=True)
def _ctrl_c_stays_with_pytest() -> Generator[None, None, None]:
    """Fail the test that leaves Ctrl-C ignored or handled otherwise in this process: the
    CLI processes later tests start would inherit an ignored SIGINT, and their Ctrl-C
    tests would fail."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    assert after == before, f"SIGINT handler changed from {before!r} to {after!r}"
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, []), "SIGINT blocked"
