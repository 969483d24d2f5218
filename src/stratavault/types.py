"""Value types shared by every layer."""

from __future__ import annotations

import enum
from typing import NewType

__all__ = ["CHUNK_ID_BYTES", "BlobKind", "ChunkId"]

CHUNK_ID_BYTES = 32

ChunkId = NewType("ChunkId", bytes)
"""Keyed BLAKE3 hash (32 bytes) of a chunk's plaintext; leaks nothing about the content."""


class BlobKind(enum.IntEnum):
    """What a blob in a pack holds; part of the AEAD associated data."""

    DATA = 0
    """A chunk of file or disk content."""
    TREE = 1
    """A serialized directory listing (file tree) or a disk index segment."""
