"""The repository: an encrypted, deduplicated chunk store on a storage backend.

The on-backend format is described byte by byte in ``docs/format.md``.
"""

from stratavault.repo._collect import GcResult
from stratavault.repo._crypto import ChunkSealer, KdfParams
from stratavault.repo._gc import GcPlan, PendingDeletion
from stratavault.repo._keys import KeyInfo
from stratavault.repo._locks import LockInfo
from stratavault.repo._repository import (
    Repository,
    default_cache_dir,
)
from stratavault.repo._values import ChunkInfo, RepoStats

__all__ = [
    "ChunkInfo",
    "ChunkSealer",
    "GcPlan",
    "GcResult",
    "KdfParams",
    "KeyInfo",
    "LockInfo",
    "PendingDeletion",
    "RepoStats",
    "Repository",
    "default_cache_dir",
]
