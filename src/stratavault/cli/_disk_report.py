"""The report of a disk or VM backup, shared by ``backup image`` and ``backup vm``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stratavault.cli._output import Output, format_bytes
from stratavault.errors import IncompleteSnapshotError

if TYPE_CHECKING:
    from stratavault.snapshot import Snapshot


def report_disk_backup(out: Output, snap: Snapshot) -> int:
    """Print what a disk or VM backup did (text or a JSON summary); exit code."""
    s = snap.summary
    full_read = (snap.vm_config or {}).get("full_read") or {}
    for d in snap.disks:
        out.text(f"Disk {d.name}: {format_bytes(d.size_bytes)} ({d.path})")
        if full_read.get(d.name):
            out.text(f"  read in full: {full_read[d.name]}")
    out.text(
        f"Read {format_bytes(s.bytes_read)}; added to the repository: "
        f"{format_bytes(s.bytes_added_stored)} ({s.chunks_added} new chunks)"
    )
    out.text(f"processed {format_bytes(s.bytes_processed)} in {s.duration_s:.2f}s")
    out.text(f"snapshot {snap.short_id} saved")
    summary: dict[str, object] = {
        "message_type": "summary",
        "snapshot_id": snap.id,
        "disks": [d.to_json() for d in snap.disks],
    }
    summary.update(snap.to_document()["summary"])
    summary.update(
        incomplete=snap.incomplete, errors=[{"path": e.path, "error": e.error} for e in snap.errors]
    )
    out.data(summary)
    if snap.incomplete:
        raise IncompleteSnapshotError(
            f"snapshot {snap.short_id} saved, but {len(snap.errors)} disk(s) changed while "
            "read: stop the VM, or back it up with backup vm"
        )
    return 0
