"""``stratavault prune``: remove data that no snapshot references."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output, format_bytes

if TYPE_CHECKING:
    from stratavault.jobs import PruneResult
    from stratavault.repo import Repository


def parse_fraction(text: str) -> float:
    """``5%`` or ``0.05`` as a fraction in [0, 1]."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a percentage like 5% (0-100%)")
    return value


def add_prune_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``prune`` and ``forget --prune``."""
    p.add_argument(
        "--max-unused",
        type=parse_fraction,
        default=0.05,
        metavar="PERCENT",
        help="repack packs until at most this share of the stored bytes is unused (default 5%%)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for running backups before leaving deletions to the next prune",
    )


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("prune", parents=[common], help="remove data no snapshot references")
    add_prune_options(p)
    p.add_argument("-n", "--dry-run", action="store_true", help="show the plan, change nothing")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Prune and report."""
    with open_repo(options) as repo:
        run_prune(repo, ns, Output(json_mode=options.json, quiet=options.quiet))
    return 0


def run_prune(repo: Repository, ns: argparse.Namespace, out: Output) -> PruneResult:
    """Prune ``repo`` with the options in ``ns`` and print the report (also for forget)."""
    from stratavault.jobs import prune

    result = prune(
        repo, max_unused=ns.max_unused, dry_run=getattr(ns, "dry_run", False), wait_s=ns.wait
    )
    report(out, result)
    return result


def report(out: Output, result: PruneResult) -> None:
    """What was planned, deleted and postponed, as text or one JSON document."""
    plan = result.plan
    doc: dict[str, Any] = {"message_type": "prune", "dry_run": result.dry_run}
    if plan is not None:
        out.text(
            f"{plan.packs} packs, {format_bytes(plan.pack_bytes)}: "
            f"{plan.live_chunks} live chunks in {format_bytes(plan.live_bytes)}, "
            f"{format_bytes(plan.unused_bytes)} unused"
        )
        verb = "would" if result.dry_run else "will"
        out.text(
            f"{verb} delete {len(plan.delete)} packs and repack {len(plan.repack)} "
            f"(copying {plan.copy_chunks} chunks, {format_bytes(plan.copy_bytes)}): "
            f"frees {format_bytes(plan.freed_bytes)}"
        )
        if plan.missing_packs:
            out.warn(f"{len(plan.missing_packs)} indexed packs are missing; dropped from index")
        if plan.unindexed_packs:
            out.text(f"{plan.unindexed_packs} packs not in the index (left untouched)")
        doc.update(
            packs=plan.packs, pack_bytes=plan.pack_bytes, live_chunks=plan.live_chunks,
            live_bytes=plan.live_bytes, unused_bytes=plan.unused_bytes,
            delete_packs=len(plan.delete), repack_packs=len(plan.repack),
            copy_chunks=plan.copy_chunks, copy_bytes=plan.copy_bytes,
            freed_bytes=plan.freed_bytes, missing_packs=list(plan.missing_packs),
            unindexed_packs=plan.unindexed_packs,
        )  # fmt: skip
    for found in result.finished:
        if found.restored_packs:
            out.text(f"kept {len(found.restored_packs)} packs that newer snapshots use")
    if not result.dry_run:
        out.text(f"deleted {result.deleted_packs} packs, {format_bytes(result.deleted_bytes)}")
    locked = _report_locked(out, result)
    if result.retention_extended:
        out.text(f"object lock: retention of {result.retention_extended} objects in use extended")
    postponed = []
    for plan_left, locks in result.postponed:
        who = ", ".join(f"{lock.host} pid {lock.pid}" for lock in locks) or "-"
        out.text(
            f"{len(plan_left.packs)} packs wait for running backups ({who}); "
            "the next prune deletes them"
        )
        postponed.append({"plan": plan_left.name, "packs": len(plan_left.packs), "locks": who})
    doc.update(
        deleted_packs=result.deleted_packs, deleted_bytes=result.deleted_bytes,
        postponed=postponed, damaged_plans=result.damaged_plans, locked_packs=locked,
        retention_extended=result.retention_extended,
    )  # fmt: skip
    out.data(doc)


def _report_locked(out: Output, result: PruneResult) -> list[dict[str, Any]]:
    """Say which packs object lock keeps, and until when; their JSON form."""
    locked = result.locked_packs
    dates = sorted(until for _, until in locked if until is not None)
    if locked:
        when = (
            f"until {dates[0]:%Y-%m-%d %H:%M} UTC"
            + (f" (the last until {dates[-1]:%Y-%m-%d %H:%M} UTC)" if dates[-1] != dates[0] else "")
            if dates
            else "for a retention the store did not tell"
        )
        out.text(
            f"could not delete {len(locked)} unused packs yet: object lock keeps them {when}; "
            "a prune after that deletes them"
        )
    return [
        {"pack": pack, "retain_until": until.isoformat() if until else None}
        for pack, until in locked
    ]
