"""``stratavault init``: create a repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from stratavault.cli._context import GlobalOptions, kdf_params, read_new_passphrase, storage_for
from stratavault.cli._output import Output
from stratavault.repo import Repository


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("init", parents=[common], help="create a new repository")
    p.add_argument("--new-password-file", type=Path, help="passphrase of the first key slot")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Create the repository and print its id."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    passphrase = read_new_passphrase(ns.new_password_file, options, may_reuse_current=True)
    storage = storage_for(options)
    try:
        with Repository.init(
            storage, passphrase, cache_dir=options.effective_cache_dir, kdf=kdf_params()
        ) as repo:
            out.text(f"created repository {repo.id} at {storage.properties.location}")
            out.data(
                {
                    "message_type": "initialized",
                    "id": repo.id,
                    "repository": storage.properties.location,
                }
            )
    finally:
        storage.close()
    return 0
