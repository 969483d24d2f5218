"""``stratavault init``: create a repository."""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from stratavault.cli._context import (
    GlobalOptions,
    kdf_params,
    path_arg,
    read_new_passphrase,
    storage_for,
)
from stratavault.cli._output import Output
from stratavault.cli._passphrases import add_from_password_options, open_other_repo


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("init", parents=[common], help="create a new repository")
    p.add_argument("--new-password-file", type=path_arg, help="passphrase of the first key slot")
    p.add_argument(
        "--immutable-days",
        type=int,
        metavar="N",
        help="keep every object for N days with S3 object lock (COMPLIANCE mode; the bucket "
        "must have object lock enabled; refused for a local folder)",
    )
    p.add_argument(
        "--copy-params-from",
        metavar="REPO",
        help="share the chunk-id key and chunker parameters of REPO (its own master key and "
        "passphrases), so that copies between the two read only the chunks they lack",
    )
    add_from_password_options(p)
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Create the repository and print its id."""
    from stratavault.repo import Repository

    out = Output(json_mode=options.json, quiet=options.quiet)
    passphrase = read_new_passphrase(ns.new_password_file, options, may_reuse_current=True)
    with ExitStack() as stack:
        params = None
        if ns.copy_params_from:
            params = stack.enter_context(open_other_repo(options, ns.copy_params_from, ns))
        storage = storage_for(options)
        stack.callback(storage.close)
        with Repository.init(
            storage,
            passphrase,
            cache_dir=options.effective_cache_dir,
            kdf=kdf_params(),
            immutable_days=ns.immutable_days,
            copy_params_from=params,
        ) as repo:
            out.text(f"created repository {repo.id} at {storage.properties.location}")
            if ns.immutable_days:
                out.text(f"objects are kept by object lock for {ns.immutable_days} days")
            out.data(
                {
                    "message_type": "initialized",
                    "id": repo.id,
                    "repository": storage.properties.location,
                    "immutable_days": ns.immutable_days,
                    "copy_params_from": params.id if params is not None else None,
                }
            )
    return 0
