"""``stratavault key add|list|remove|passwd``: manage the passphrase key slots."""

from __future__ import annotations

import argparse

from stratavault.cli._context import (
    GlobalOptions,
    kdf_params,
    open_repo,
    path_arg,
    read_new_passphrase,
)
from stratavault.cli._output import Output


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("key", parents=[common], help="manage passphrase key slots")
    keysub = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    add = keysub.add_parser("add", parents=[common], help="add a key slot with a new passphrase")
    add.add_argument("--new-password-file", type=path_arg)
    add.set_defaults(run=run_add)
    ls = keysub.add_parser("list", parents=[common], help="list key slots")
    ls.set_defaults(run=run_list)
    rm = keysub.add_parser("remove", parents=[common], help="remove a key slot")
    rm.add_argument("key_id", help="id (or unique prefix) of the slot to remove")
    rm.set_defaults(run=run_remove)
    pw = keysub.add_parser("passwd", parents=[common], help="change the passphrase in use")
    pw.add_argument("--new-password-file", type=path_arg)
    pw.set_defaults(run=run_passwd)


def run_add(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Add a slot."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        key_id = repo.add_key(
            read_new_passphrase(ns.new_password_file, options, may_reuse_current=False),
            kdf=kdf_params(),
        )
    out.text(f"added key {key_id}")
    out.data({"message_type": "key_added", "id": key_id})
    return 0


def run_list(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """List the slots; the one in use is marked."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        keys = repo.list_keys()
    out.data(
        [
            {"id": k.id, "current": k.current, "created": k.created, "host": k.host, "user": k.user}
            for k in keys
        ]
    )
    out.table(
        ["", "ID", "Created", "Host", "User"],
        [("*" if k.current else "", k.id[:16], k.created, k.host, k.user) for k in keys],
    )
    return 0


def run_remove(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Remove a slot (not the one in use, not the last)."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        match = [k.id for k in repo.list_keys() if k.id.startswith(ns.key_id)]
        if len(match) != 1:
            from stratavault.errors import UsageError

            raise UsageError(f"key {ns.key_id!r} matches {len(match)} key slots, expected one")
        repo.remove_key(match[0])
    out.text(f"removed key {match[0]}")
    out.data({"message_type": "key_removed", "id": match[0]})
    return 0


def run_passwd(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Replace the slot in use by one with a new passphrase; no data is rewritten."""
    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        new_id = repo.change_passphrase(
            read_new_passphrase(ns.new_password_file, options, may_reuse_current=False)
        )
    out.text(f"passphrase changed; key is now {new_id}")
    out.data({"message_type": "key_changed", "id": new_id})
    return 0
