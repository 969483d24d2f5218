"""``stratavault serve-nbd SNAPSHOT [--disk NAME] [--writable] [--socket PATH | --listen
HOST:PORT]``: export the disks of a snapshot over NBD until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from stratavault.cli._context import GlobalOptions, open_repo, path_arg
from stratavault.cli._output import Output
from stratavault.errors import UsageError


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser(
        "serve-nbd",
        parents=[common],
        help="export the disks of a snapshot over NBD",
        description="Serve the disks of SNAPSHOT over NBD, one export per disk named by the "
        "disk, until Ctrl-C. Read-only, or with --writable through local copy-on-write "
        "overlays that are dropped at the end: the backup is never changed.",
    )
    p.add_argument("snapshot", metavar="SNAPSHOT", help="'latest' or an id")
    p.add_argument(
        "--disk", action="append", default=[], metavar="NAME", help="serve only this disk (repeat)"
    )
    p.add_argument(
        "--writable", action="store_true", help="accept writes into a local overlay (discarded)"
    )
    p.add_argument("--overlay-dir", type=path_arg, help="with --writable: where overlays go")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", type=path_arg, metavar="PATH", help="listen on a unix socket")
    where.add_argument(
        "--listen", metavar="HOST:PORT", help="listen on TCP (default 127.0.0.1:10809)"
    )
    p.set_defaults(run=run)


def _tcp(listen: str | None) -> tuple[str, int]:
    if listen is None:
        return "127.0.0.1", 10809
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"serve-nbd: --listen {listen!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Serve until Ctrl-C or SIGTERM; exit 0 then."""
    from stratavault.jobs import ServeOptions, serve_snapshot
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=options.json, quiet=options.quiet)
    if ns.overlay_dir is not None and not ns.writable:
        raise UsageError("serve-nbd: --overlay-dir goes with --writable")
    host, port = _tcp(ns.listen) if ns.socket is None else ("", 0)
    job = ServeOptions(
        disks=tuple(ns.disk), writable=ns.writable, overlay_dir=ns.overlay_dir,
        unix_path=ns.socket, host=host, port=port,
    )  # fmt: skip
    stop = threading.Event()
    with open_repo(options) as repo:
        snap = find_snapshot(repo, ns.snapshot)
        with serve_snapshot(repo, snap, job) as served:
            mode = "writable (overlay, discarded at exit)" if ns.writable else "read-only"
            for name, uri in served.uris.items():
                out.text(f"disk {name}: {uri}")
            out.text(f"serving snapshot {snap.short_id} {mode} on {served.address}; Ctrl-C stops")
            out.data(
                {"message_type": "serving", "snapshot_id": snap.id, "address": served.address,
                 "writable": ns.writable, "exports": served.uris}
            )  # fmt: skip
            sys.stdout.flush()
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                signal.signal(signal.SIGTERM, previous)
    out.text("stopped")
    return 0
