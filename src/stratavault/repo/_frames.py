"""Frames: several chunks compressed together and encrypted as one blob.

A disk's neighbouring chunks share much of their content's statistics; zstd compresses four
256 KiB chunks together about 5 % smaller than one by one, at the same speed. Each member
keeps its own id (dedup, disk indexes and prune still work per chunk); its header and index
entries carry the frame's offset and stored length, its own raw length and ``KIND_FRAMED``
in the kind byte. See docs/format.md ("Frames").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stratavault._loading_cache import LoadingCache
from stratavault.repo import _formats as F
from stratavault.repo._crypto import MasterKeys, compress, decompress

__all__ = ["FRAMES_CACHED", "Frame", "FrameCache", "frame_ad", "is_framed", "seal_frame"]


def is_framed(kind: int) -> bool:
    """Whether an entry's kind byte says its chunk lives in a frame."""
    return bool(kind & F.KIND_FRAMED)


def frame_ad(kind: int) -> bytes:
    """Associated data of a frame blob (``kind`` includes ``KIND_FRAMED``)."""
    return F.AD_FRAME + bytes((kind | F.KIND_FRAMED,))


def seal_frame(
    keys: MasterKeys, kind: int, members: Sequence[tuple[bytes, bytes | memoryview]], level: int
) -> bytearray:
    """The stored blob of a frame holding ``members`` (``(chunk id, data)``, 2 to
    ``FRAME_MAX_MEMBERS``): member table, then the members' bytes compressed together."""
    if not 2 <= len(members) <= F.FRAME_MAX_MEMBERS:
        raise ValueError(f"a frame holds 2 to {F.FRAME_MAX_MEMBERS} chunks, not {len(members)}")
    table = [F.FRAME_COUNT.pack(len(members))]
    table += [F.FRAME_MEMBER.pack(cid, len(data)) for cid, data in members]
    body = compress(b"".join(data for _, data in members), level)
    return keys.seal_blob(b"".join(table) + body, frame_ad(kind))


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame's plaintext: where each member's bytes are in ``body``."""

    spans: dict[bytes, tuple[int, int]]
    """chunk id -> (start, length) in ``body``"""
    body: bytes

    @classmethod
    def decode(cls, plain: bytes, max_bytes: int) -> Frame:
        """Parse a frame's authenticated plaintext; ValueError when it is malformed."""
        if len(plain) < F.FRAME_COUNT.size:
            raise ValueError("frame shorter than its member count")
        (count,) = F.FRAME_COUNT.unpack_from(plain)
        table_end = F.FRAME_COUNT.size + count * F.FRAME_MEMBER.size
        if not 2 <= count <= F.FRAME_MAX_MEMBERS or len(plain) <= table_end:
            raise ValueError(f"frame with {count} members does not fit its {len(plain)} bytes")
        spans: dict[bytes, tuple[int, int]] = {}
        start = 0
        for at in range(F.FRAME_COUNT.size, table_end, F.FRAME_MEMBER.size):
            cid, length = F.FRAME_MEMBER.unpack_from(plain, at)
            spans[cid] = (start, length)
            start += length
        if start > max_bytes:
            raise ValueError(f"frame members add up to {start} bytes, more than {max_bytes}")
        body = decompress(plain[table_end:], start)
        if len(body) != start:
            raise ValueError(f"frame body is {len(body)} bytes, its members add up to {start}")
        return cls(spans, body)

    def member(self, chunk_id: bytes) -> bytes:
        """The bytes of one member; ValueError when the frame does not hold it."""
        span = self.spans.get(chunk_id)
        if span is None:
            raise ValueError("the frame does not hold this chunk (moved or swapped)")
        start, length = span
        return self.body[start : start + length]


FrameCache = LoadingCache[tuple[str, int], Frame]
"""The frames decoded last, by ``(pack, offset)``: reading a frame's members one by one
(instant recovery, file-level restore) decrypts and decompresses it once, also when several
threads want members of the same frame at once (read-ahead)."""

FRAMES_CACHED = 8
"""Frames a repository keeps decoded."""
