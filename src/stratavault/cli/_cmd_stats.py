"""``stratavault stats [SNAPSHOT]``: sizes of the repository or of one snapshot."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from stratavault.cli._context import GlobalOptions, open_repo
from stratavault.cli._output import Output, format_bytes

if TYPE_CHECKING:
    from stratavault.repo import Repository
    from stratavault.snapshot import Snapshot


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add the command to the parser."""
    p = sub.add_parser("stats", parents=[common], help="repository or snapshot sizes")
    p.add_argument("snapshot", nargs="?", help="a snapshot ('latest' or an id)")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace, options: GlobalOptions) -> int:
    """Print sizes: repository totals, and the snapshot's restore size if one is given."""
    from stratavault.jobs import snapshot_size
    from stratavault.snapshot import find_snapshot

    out = Output(json_mode=options.json, quiet=options.quiet)
    with open_repo(options) as repo:
        snap = find_snapshot(repo, ns.snapshot) if ns.snapshot else None  # before any output
        st = repo.stats()
        doc: dict[str, object] = {
            "snapshots": st.snapshots,
            "packs": st.packs,
            "chunks": st.chunks,
            "stored_bytes": st.pack_bytes,
            "raw_bytes": st.raw_bytes,
            "compression_ratio": round(st.raw_bytes / st.pack_bytes, 3) if st.pack_bytes else None,
        }
        out.text(f"snapshots:        {st.snapshots}")
        out.text(f"chunks:           {st.chunks} in {st.packs} packs")
        out.text(f"unique raw data:  {format_bytes(st.raw_bytes)}")
        out.text(f"stored:           {format_bytes(st.pack_bytes)}")
        if snap is not None:
            if snap.tree is None:
                doc["snapshot"] = _disk_stats(out, repo, snap)
                out.data(doc)
                return 0
            size = snapshot_size(repo, snap)
            out.text(
                f"snapshot {snap.short_id}: {size.files} files, {size.dirs} folders, "
                f"restore size {format_bytes(size.restore_bytes)}, "
                f"{size.unique_chunks} distinct chunks "
                f"({format_bytes(size.unique_chunk_bytes)})"
            )
            doc["snapshot"] = {
                "id": snap.id,
                "files": size.files,
                "dirs": size.dirs,
                "restore_bytes": size.restore_bytes,
                "unique_chunks": size.unique_chunks,
                "unique_chunk_bytes": size.unique_chunk_bytes,
            }
    out.data(doc)
    return 0


def _disk_stats(out: Output, repo: Repository, snap: Snapshot) -> dict[str, object]:
    """A snapshot of disks: per disk its size, the data it holds and its distinct chunks."""
    from stratavault.jobs import describe_disks

    disks = describe_disks(repo, snap)
    for d in disks:
        out.text(
            f"snapshot {snap.short_id} disk {d.name}: size {format_bytes(d.size_bytes)}, "
            f"data {format_bytes(d.data_bytes)} in {d.data_chunks} of {d.chunks} chunks "
            f"of {format_bytes(d.chunk_bytes)} ({d.unique_chunks} distinct)"
        )
    return {"id": snap.id, "disks": [d.to_json() for d in disks]}
