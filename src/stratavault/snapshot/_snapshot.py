"""What a backup is: the snapshot document and how snapshots are selected."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stratavault.errors import IntegrityError, SnapshotNotFoundError, UnsupportedFormatError
from stratavault.snapshot._disk import DiskRef
from stratavault.types import ChunkId

__all__ = ["FileError", "RepairRecord", "Snapshot", "SnapshotSummary", "latest", "select_snapshots"]

SNAPSHOT_VERSION = 1


@dataclass(slots=True)
class FileError:
    """A path that could not be backed up completely, and why."""

    path: str
    error: str


@dataclass(slots=True)
class RepairRecord:
    """What ``repair snapshots`` did: the damaged snapshot replaced, and each change."""

    original: str
    removed: list[FileError] = field(default_factory=list)


@dataclass(slots=True)
class SnapshotSummary:
    """Counters of one backup run."""

    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs: int = 0
    entries: int = 0
    bytes_processed: int = 0
    bytes_read: int = 0
    chunks_added: int = 0
    bytes_added_stored: int = 0
    duration_s: float = 0.0


@dataclass(slots=True)
class Snapshot:
    """One backup point of one source; immutable once saved."""

    time: dt.datetime
    host: str
    paths: list[str]
    tree: ChunkId | None
    """Root of the file tree; ``None`` for a snapshot of disks only (kind "image"/"vm")."""
    kind: str = "files"
    """"files" (a file tree), "image" (disk images) or "vm" (a VM's disks + configuration)."""
    user: str = ""
    tags: list[str] = field(default_factory=list)
    parent: str | None = None
    errors: list[FileError] = field(default_factory=list)
    summary: SnapshotSummary = field(default_factory=SnapshotSummary)
    program_version: str = ""
    protected: bool = False
    """No retention policy removes a protected snapshot (``protect``/``unprotect``)."""
    id: str = ""
    """Repository id of the saved snapshot ("" until saved)."""
    disks: list[DiskRef] = field(default_factory=list)
    """The disks of an "image" or "vm" snapshot (absent from older documents: none)."""
    vm_config: dict[str, Any] | None = None
    """The VM's configuration (JSON-able: command line or domain XML, disk layout)."""
    repair: RepairRecord | None = None
    """Set on a snapshot written by ``repair snapshots`` (absent from other documents)."""

    @property
    def incomplete(self) -> bool:
        """True when some files could not be read; they are listed in ``errors``."""
        return bool(self.errors)

    @property
    def short_id(self) -> str:
        """The first 8 hex digits of the id."""
        return self.id[:8]

    def to_document(self) -> dict[str, Any]:
        """Return the JSON document stored in the repository."""
        return {
            "v": SNAPSHOT_VERSION,
            "time": self.time.isoformat(),
            "host": self.host,
            "user": self.user,
            "paths": list(self.paths),
            "tags": list(self.tags),
            "kind": self.kind,
            "tree": self.tree.hex() if self.tree is not None else None,
            "parent": self.parent,
            "incomplete": self.incomplete,
            "errors": [{"path": e.path, "error": e.error} for e in self.errors],
            "summary": {k: getattr(self.summary, k) for k in SnapshotSummary.__slots__},
            "program_version": self.program_version,
            "protected": self.protected,
            **({"disks": [d.to_json() for d in self.disks]} if self.disks else {}),
            **({"vm_config": self.vm_config} if self.vm_config is not None else {}),
            **({"repair": _repair_json(self.repair)} if self.repair is not None else {}),
        }

    @classmethod
    def from_document(cls, snapshot_id: str, doc: dict[str, Any]) -> Snapshot:
        """Build a snapshot from its stored document; errors name the snapshot."""
        if doc.get("v") != SNAPSHOT_VERSION:
            raise UnsupportedFormatError(
                f"snapshot {snapshot_id[:8]}: format version {doc.get('v')!r} is unknown"
            )
        try:
            summary = SnapshotSummary(**doc.get("summary", {}))
            return cls(
                id=snapshot_id,
                time=dt.datetime.fromisoformat(doc["time"]),
                host=str(doc["host"]),
                user=str(doc.get("user", "")),
                paths=[str(p) for p in doc["paths"]],
                tags=[str(t) for t in doc.get("tags", [])],
                kind=str(doc.get("kind", "files")),
                tree=ChunkId(bytes.fromhex(doc["tree"])) if doc.get("tree") else None,
                parent=doc.get("parent"),
                errors=[FileError(str(e["path"]), str(e["error"])) for e in doc.get("errors", [])],
                summary=summary,
                program_version=str(doc.get("program_version", "")),
                protected=bool(doc.get("protected", False)),
                disks=[DiskRef.from_json(d) for d in doc.get("disks", [])],
                vm_config=doc.get("vm_config"),
                repair=_repair_record(doc["repair"]) if doc.get("repair") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"snapshot {snapshot_id[:8]}: malformed document: {exc}") from exc


def _repair_json(record: RepairRecord) -> dict[str, Any]:
    removed = [{"path": e.path, "error": e.error} for e in record.removed]
    return {"original": record.original, "removed": removed}


def _repair_record(doc: dict[str, Any]) -> RepairRecord:
    removed = [FileError(str(e["path"]), str(e["error"])) for e in doc.get("removed", [])]
    return RepairRecord(str(doc["original"]), removed)


def select_snapshots(
    snapshots: Iterable[Snapshot],
    *,
    hosts: Sequence[str] = (),
    tags: Sequence[str] = (),
    paths: Sequence[str] = (),
) -> list[Snapshot]:
    """Return the snapshots matching every given filter, oldest first.

    ``tags`` entries may be comma-separated groups: a snapshot matches a group if it
    has all of its tags, and matches ``tags`` if it matches any group (restic's rule).
    """
    groups = [set(t.split(",")) for t in tags]
    out = [
        s
        for s in snapshots
        if (not hosts or s.host in hosts)
        and (not groups or any(g <= set(s.tags) for g in groups))
        and (not paths or sorted(paths) == sorted(s.paths))
    ]
    return sorted(out, key=lambda s: (s.time, s.id))


def latest(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Return the newest snapshot, or raise ``SnapshotNotFoundError``."""
    ordered = sorted(snapshots, key=lambda s: (s.time, s.id))
    if not ordered:
        raise SnapshotNotFoundError("no snapshot matches")
    return ordered[-1]
