"""``stratavault verify SNAPSHOT --boot [--timeout S] [--expect TEXT]``: boot a backed-up VM
in isolation and report whether it comes to life (exit 16 when it does not)."""

from __future__ import annotations

import argparse

from stratavault.cli._context import GlobalOptions, open_repo, path_arg
from stratavault.cli._output import Output
from stratavault.errors import UsageError, VerificationFailedError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="test a restore: boot a backed-up VM in isolation",
        description="Boot the VM of SNAPSHOT from its served disks under throw-away overlays, "
        "without network, and pass when the guest shows a sign of life in time: a line of "
        "the serial console matching --expect, else an answer of its guest agent. The "
        "console log is kept. Exit 16 when the VM does not come to life.",
    )
    p.add_argument("snapshot", metavar="SNAPSHOT", help="'latest' or an id")
    p.add_argument("--boot", action="store_true", help="boot the VM (the only check for now)")
    p.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="seconds to wait (300)"
    )
    p.add_argument(
        "--expect", metavar="TEXT", help="regular expression awaited on the serial console"
    )
    p.add_argument("--log-dir", type=path_arg, help="where the console log is kept (default: /tmp)")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Boot, watch, report; raise VerificationFailedError on failure."""
    from stratavault.jobs import BootCheckOptions, verify_boot
    from stratavault.snapshot import find_snapshot

    if not ns.boot:
        raise UsageError("verify: say what to verify: --boot")
    if ns.timeout <= 0:
        raise UsageError("verify --boot: --timeout must be positive")
    out = Output(json_mode=options.json, quiet=options.quiet)
    job = BootCheckOptions(timeout_s=ns.timeout, expect=ns.expect, log_dir=ns.log_dir)
    with open_repo(options) as repo:
        snap = find_snapshot(repo, ns.snapshot)
        result = verify_boot(repo, snap, job)
    verdict = "passed" if result.passed else "FAILED"
    out.text(f"boot test of snapshot {snap.short_id} {verdict} in {result.seconds:.1f} s: "
             f"{result.reason}")  # fmt: skip
    out.text(f"console log: {result.console_log}")
    out.data(
        {"message_type": "verify_boot", "snapshot_id": snap.id, "passed": result.passed,
         "reason": result.reason, "seconds": round(result.seconds, 3),
         "console_log": str(result.console_log)}
    )  # fmt: skip
    if not result.passed:
        raise VerificationFailedError(
            f"boot test of snapshot {snap.short_id} failed - {result.reason} "
            f"(console log {result.console_log})"
        )
    return 0
