"""A second repository on the command line (``copy``, ``init --copy-params-from``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from stratavault.cli._context import GlobalOptions, path_arg, read_passphrase, storage_for

if TYPE_CHECKING:
    from stratavault.repo import Repository

__all__ = ["add_from_password_options", "open_other_repo", "passphrase_for"]


def add_from_password_options(p: argparse.ArgumentParser, side: str = "from") -> None:
    """``--<side>-password-file`` and ``--<side>-password-command``."""
    p.add_argument(
        f"--{side}-password-file",
        type=path_arg,
        metavar="FILE",
        help=f"passphrase of the --{side} repository (default: the usual passphrase)",
    )
    p.add_argument(
        f"--{side}-password-command", metavar="CMD", help="run this to get that passphrase"
    )


def passphrase_for(options: GlobalOptions, ns: argparse.Namespace, side: str) -> bytes:
    """The passphrase of the ``side`` repository: its own options, else the usual sources."""
    file = getattr(ns, f"{side}_password_file", None)
    command = getattr(ns, f"{side}_password_command", None)
    if file or command:
        own = GlobalOptions(password_file=file, password_command=command)
        return read_passphrase(own, prompt=f"passphrase of the {side} repository: ")
    return read_passphrase(options, prompt=f"passphrase of the {side} repository: ")


@contextmanager
def open_other_repo(
    options: GlobalOptions, location: str, ns: argparse.Namespace, side: str = "from"
) -> Iterator[Repository]:
    """Open ``location`` with the ``side`` passphrase, the cache and limits of ``options``."""
    from stratavault.repo import Repository

    storage = storage_for(options, location=location)
    try:
        with Repository.open(
            storage, passphrase_for(options, ns, side), cache_dir=options.effective_cache_dir
        ) as repo:
            yield repo
    finally:
        storage.close()
