"""Value types the repository hands out."""

from __future__ import annotations

from dataclasses import dataclass

from stratavault.types import BlobKind

__all__ = ["ChunkInfo", "RepoStats"]


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """Where and how a chunk is stored."""

    pack: str
    offset: int
    stored_bytes: int
    raw_bytes: int
    kind: BlobKind


@dataclass(frozen=True, slots=True)
class RepoStats:
    """Totals of a repository."""

    packs: int
    pack_bytes: int
    chunks: int
    raw_bytes: int
    snapshots: int
