"""The ``stratavault`` command: parse, dispatch to one module per command, map errors."""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from stratavault import __version__
from stratavault._malloc import tune_malloc
from stratavault.cli import (
    _cmd_agent,
    _cmd_backup,
    _cmd_cat,
    _cmd_check,
    _cmd_copy,
    _cmd_diff,
    _cmd_dump,
    _cmd_forget,
    _cmd_init,
    _cmd_key,
    _cmd_ls,
    _cmd_protect,
    _cmd_prune,
    _cmd_repair,
    _cmd_restore,
    _cmd_serve,
    _cmd_snapshots,
    _cmd_stats,
    _cmd_unlock,
    _cmd_verify,
    _readahead,
)
from stratavault.cli._context import GlobalOptions, path_arg
from stratavault.errors import EXIT_CODES, Interrupted, StratavaultError

if TYPE_CHECKING:
    from stratavault.repo import DerivedKeys

__all__ = ["main"]

COMMANDS: tuple[ModuleType, ...] = (
    _cmd_init,
    _cmd_backup,
    _cmd_snapshots,
    _cmd_ls,
    _cmd_restore,
    _cmd_serve,
    _cmd_dump,
    _cmd_diff,
    _cmd_stats,
    _cmd_forget,
    _cmd_prune,
    _cmd_protect,
    _cmd_check,
    _cmd_verify,
    _cmd_copy,
    _cmd_repair,
    _cmd_cat,
    _cmd_key,
    _cmd_unlock,
    _cmd_agent,
)


def _global_parser(*, suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command name (restic style)."""
    default = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument(
        "-r",
        "--repo",
        dest="repository",
        metavar="REPO",
        default=default,
        help="repository location (or STRATAVAULT_REPOSITORY)",
    )
    g.add_argument(
        "--password-file",
        type=path_arg,
        default=default,
        help="read the passphrase from this file (or STRATAVAULT_PASSWORD_FILE)",
    )
    g.add_argument(
        "--password-command",
        default=default,
        help="run this to get the passphrase (or STRATAVAULT_PASSWORD_COMMAND)",
    )
    g.add_argument("--cache-dir", type=path_arg, default=default, help="local cache folder")
    g.add_argument(
        "--no-cache", action="store_true", default=default or False, help="do not use a local cache"
    )
    g.add_argument(
        "--json", action="store_true", default=default or False, help="machine-readable output"
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default or False,
        help="print nothing but errors",
    )
    g.add_argument(
        "--limit-upload",
        dest="limit_upload_kib",
        type=int,
        metavar="KiB/s",
        default=default,
        help="limit upload bandwidth",
    )
    g.add_argument(
        "--limit-download",
        dest="limit_download_kib",
        type=int,
        metavar="KiB/s",
        default=default,
        help="limit download bandwidth",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every command."""
    epilog = "exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="stratavault",
        description="Backup and replication for virtualized infrastructure.",
        parents=[_global_parser(suppress=False)],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stratavault {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _global_parser(suppress=True)
    for module in COMMANDS:
        module.register(sub, common)
    return parser


def _options(ns: argparse.Namespace, derived_keys: DerivedKeys | None = None) -> GlobalOptions:
    return GlobalOptions(
        repository=ns.repository,
        password_file=ns.password_file,
        password_command=ns.password_command,
        cache_dir=ns.cache_dir,
        no_cache=ns.no_cache,
        json=ns.json,
        quiet=ns.quiet,
        limit_upload_kib=ns.limit_upload_kib,
        limit_download_kib=ns.limit_download_kib,
        derived_keys=derived_keys,
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    read_ahead: bool = False,
    derived_keys: DerivedKeys | None = None,
) -> int:
    """Run the command line; return the exit code (documented in ``--help``).

    ``read_ahead`` (the console script): read ahead the files this command loaded last
    time, and list the ones it loads now (see :mod:`stratavault.cli._readahead`).
    ``derived_keys``: the host agent's memory of key derivations (:mod:`._agent`).
    """
    # numpy's BLAS is never used: it need not start a thread per core when numpy loads
    # (25-30 ms of every disk command's start here). Set before anything imports numpy.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    tune_malloc()
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    options = _options(ns, derived_keys)
    manifest = None
    if read_ahead:
        manifest = _readahead.manifest_path(options.effective_cache_dir, _command_name(ns))
    if manifest is not None:
        _readahead.read_ahead(manifest)
    code = _dispatch(ns, options)
    if manifest is not None and code != Interrupted.exit_code:
        _readahead.record(manifest)
    return code


def _command_name(ns: argparse.Namespace) -> str:
    """``backup-run_image``: the command and the function that runs it."""
    return f"{ns.command}-{ns.run.__name__}"


def _dispatch(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Run the parsed command; map its errors to messages and exit codes."""
    try:
        code: int = ns.run(ns, options)
    except Interrupted as exc:
        print(f"stratavault: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("stratavault: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except StratavaultError as exc:
        print(f"stratavault: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        if _stdout_closed_by_reader():  # `stratavault ls | head`: quiet, as a shell tool
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
            return _EXIT_OUTPUT_CLOSED
        print("stratavault: broken pipe", file=sys.stderr)
        return 1
    except OSError as exc:  # the jobs name their own: this is writing the output
        if exc.errno not in _OUTPUT_ERRORS:
            raise
        print(f"stratavault: writing the output - {exc.strerror}", file=sys.stderr)
        return 1
    return code


_OUTPUT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
"""Errors writing standard output (a full disk, ``> /dev/full``): a message, exit 1."""


_EXIT_OUTPUT_CLOSED = 141
"""Standard output is a pipe whose reader went away: 128 + SIGPIPE, what a shell reports
for a tool that SIGPIPE ended (in ``EXIT_CODES``)."""


def _stdout_closed_by_reader() -> bool:
    """Whether standard output is a pipe with no reader left (poll reports an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False
