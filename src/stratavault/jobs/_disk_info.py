"""Use case: describe the disks of a snapshot (for ``ls`` and ``stats``)."""

from __future__ import annotations

from dataclasses import dataclass

from stratavault.repo import Repository
from stratavault.snapshot import Snapshot, load_disk_index

__all__ = ["DiskInfo", "describe_disks"]


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One disk of a snapshot: its shape and how much of it holds data."""

    name: str
    size_bytes: int
    chunk_bytes: int
    chunks: int
    data_chunks: int
    """Chunks that are not all zeros (the others are markers, never stored)."""
    data_bytes: int
    unique_chunks: int
    path: str

    def to_json(self) -> dict[str, object]:
        """The form printed by ``--json``."""
        return {
            "name": self.name,
            "size": self.size_bytes,
            "chunk_size": self.chunk_bytes,
            "chunks": self.chunks,
            "data_chunks": self.data_chunks,
            "data_bytes": self.data_bytes,
            "unique_chunks": self.unique_chunks,
            "path": self.path,
        }


def describe_disks(repo: Repository, snapshot: Snapshot) -> list[DiskInfo]:
    """Read each disk index of ``snapshot`` and summarize it (empty for a file snapshot)."""
    out = []
    for ref in snapshot.disks:
        index = load_disk_index(repo, ref)
        mask = index.data_mask()
        out.append(
            DiskInfo(
                name=ref.name,
                size_bytes=ref.size_bytes,
                chunk_bytes=ref.chunk_bytes,
                chunks=index.chunk_count,
                data_chunks=int(mask.sum()),
                data_bytes=index.data_bytes(),
                unique_chunks=len(index.chunk_ids()),
                path=ref.path,
            )
        )
    return out
