"""``stratavault cat config|snapshot ID|tree SNAPSHOT[:PATH]|blob ID``: print raw objects."""

from __future__ import annotations

import argparse
import json
import sys

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.errors import ChunkNotFoundError, StratavaultError, UsageError
from stratavault.types import CHUNK_ID_BYTES, ChunkId

KINDS = ("config", "snapshot", "tree", "blob")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("cat", parents=[common], help="print an object of the repository")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("ref", nargs="?", help="snapshot id, SNAPSHOT[:PATH] for trees, chunk id")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Write the object to stdout (JSON for documents, raw bytes for blobs)."""
    from stratavault.jobs import split_snapshot_ref
    from stratavault.snapshot import encode_tree, find_snapshot, load_tree, resolve_path

    if ns.kind != "config" and not ns.ref:
        raise UsageError(f"cat {ns.kind}: an id is needed")
    with open_repo(options) as repo:
        if ns.kind == "config":
            sys.stdout.write(repo.storage.get("config").decode() + "\n")
        elif ns.kind == "snapshot":
            snap = find_snapshot(repo, ns.ref)
            print(json.dumps(repo.load_snapshot(snap.id), indent=2, sort_keys=True))
        elif ns.kind == "tree":
            ref, path = split_snapshot_ref(ns.ref)
            snap = find_snapshot(repo, ref)
            _, node = resolve_path(repo, snap, path)
            tree = snap.tree if node is None else node.subtree
            if tree is None:
                raise UsageError(f"cat tree: {path} is not a folder")
            doc = json.loads(encode_tree(load_tree(repo, tree)).decode("utf-8", "surrogateescape"))
            print(json.dumps(doc, indent=2, ensure_ascii=True))
        else:
            try:
                cid = bytes.fromhex(ns.ref)
            except ValueError:
                cid = b""
            if len(cid) != CHUNK_ID_BYTES:
                raise UsageError(f"cat blob: {ns.ref!r} is not a {CHUNK_ID_BYTES}-byte hex id")
            try:
                data = repo.read_chunk(ChunkId(cid))
            except ChunkNotFoundError:  # an id typed in: not found, not damage
                raise StratavaultError(f"cat blob: no chunk {ns.ref} in the repository") from None
            sys.stdout.buffer.write(data)
    return 0
