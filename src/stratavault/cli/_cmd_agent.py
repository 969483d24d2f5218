"""``stratavault agent [--socket PATH] [--key-ttl SECONDS]``: the host agent, which runs
the commands of clients that set ``STRATAVAULT_AGENT`` (see :mod:`._agent`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stratavault.cli._context import GlobalOptions, path_arg
from stratavault.cli._output import Output

DEFAULT_KEY_TTL_S = 900


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser(
        "agent",
        parents=[common],
        help="run commands for clients from a warm process (STRATAVAULT_AGENT)",
        description="Stay running and run the commands of clients that set "
        "STRATAVAULT_AGENT=1 (or to this socket's path) in processes forked from this "
        "one: they start without loading the program again and, with a passphrase used "
        "in the last --key-ttl seconds, without deriving its key again. Serves only the "
        "user running it. Ends on Ctrl-C or SIGTERM; running commands go on.",
    )
    p.add_argument(
        "--socket",
        type=path_arg,
        metavar="PATH",
        help="where to listen (default: $XDG_RUNTIME_DIR/stratavault/agent.sock, else "
        "/run/stratavault/agent.sock for root, /tmp/stratavault-UID/agent.sock for others)",
    )
    p.add_argument(
        "--key-ttl",
        type=float,
        default=DEFAULT_KEY_TTL_S,
        metavar="SECONDS",
        help=f"remember key derivations this long (default {DEFAULT_KEY_TTL_S}; 0: never)",
    )
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Serve until interrupted."""
    from stratavault.cli import run as run_command
    from stratavault.cli._agent import serve
    from stratavault.cli._agent_client import default_socket_path

    out = Output(json_mode=options.json, quiet=options.quiet)
    path: Path = ns.socket or default_socket_path()

    def ready(where: Path) -> None:
        out.text(f"agent listening on {where}")
        out.data({"message_type": "agent", "socket": str(where)})
        sys.stdout.flush()

    def log(message: str) -> None:
        if not options.quiet:
            print(f"stratavault agent: {message}", file=sys.stderr, flush=True)

    return serve(
        path, key_ttl_s=max(ns.key_ttl, 0.0), run_command=run_command, on_ready=ready, log=log
    )
