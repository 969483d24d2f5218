"""The repository: an encrypted, deduplicated chunk store on a storage backend.

The on-backend format is described byte by byte in ``docs/format.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stratavault._lazy import lazy_exports

if TYPE_CHECKING:
    from stratavault.repo._collect import GcResult as GcResult
    from stratavault.repo._crypto import (
        ChunkSealer as ChunkSealer,
        DerivedKeys as DerivedKeys,
        KdfParams as KdfParams,
    )
    from stratavault.repo._gc import GcPlan as GcPlan, PendingDeletion as PendingDeletion
    from stratavault.repo._keys import KeyInfo as KeyInfo
    from stratavault.repo._locks import LockInfo as LockInfo
    from stratavault.repo._opening import (
        Unlocked as Unlocked,
        default_cache_dir as default_cache_dir,
        unlock_repository as unlock_repository,
    )
    from stratavault.repo._repository import Repository as Repository
    from stratavault.repo._values import ChunkInfo as ChunkInfo, RepoStats as RepoStats

__all__, __getattr__ = lazy_exports(__name__, __file__)
