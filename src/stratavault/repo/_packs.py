"""Pack objects: many encrypted blobs, then an encrypted header, then its plain length."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stratavault.errors import IntegrityError, UnsupportedFormatError
from stratavault.repo import _formats as F
from stratavault.repo._crypto import AuthenticationFailed, MasterKeys, content_hash
from stratavault.repo._dtypes import HEADER_ENTRY

__all__ = ["OpenPack", "SealedPack", "pack_name", "parse_pack_tail", "seal_pack"]


@dataclass(slots=True)
class OpenPack:
    """A pack being filled: the blobs in order plus their header records."""

    number: int
    blobs: list[bytes | memoryview] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    raws: list[int] = field(default_factory=list)
    size: int = 0

    def append(self, chunk_id: bytes, kind: int, blob: bytes | memoryview, raw_len: int) -> int:
        """Add an encrypted blob; return its offset in the pack."""
        offset = self.size
        self.blobs.append(blob)
        self.ids.append(chunk_id)
        self.kinds.append(kind)
        self.raws.append(raw_len)
        self.size += len(blob)
        return offset

    def blob(self, chunk_id: bytes) -> bytes | memoryview | None:
        """The stored blob of ``chunk_id`` if it is in this pack (linear; packs are small)."""
        for i, cid in enumerate(self.ids):
            if cid == chunk_id:
                return self.blobs[i]
        return None


@dataclass(frozen=True, slots=True)
class SealedPack:
    """A finished pack: its object name, bytes and header entries."""

    number: int
    name: str
    data: bytes
    entries: npt.NDArray[np.void]


def pack_name(hex_hash: str) -> str:
    """Object name of the pack whose content hash is ``hex_hash``."""
    return f"{F.DATA_PREFIX}{hex_hash[:2]}/{hex_hash}"


def seal_pack(keys: MasterKeys, pack: OpenPack) -> SealedPack:
    """Build the pack bytes: blobs, encrypted header, trailer; name it by its hash."""
    count = len(pack.blobs)
    entries = np.zeros(count, dtype=HEADER_ENTRY)
    lengths = np.fromiter((len(b) for b in pack.blobs), dtype=np.uint64, count=count)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])) if count else lengths
    entries["kind"] = pack.kinds
    entries["id"] = pack.ids
    entries["offset"] = offsets
    entries["stored"] = lengths
    entries["raw"] = pack.raws
    header = F.PACK_HEADER_PREFIX.pack(F.PACK_HEADER_MAGIC, F.PACK_HEADER_VERSION, count)
    sealed_header = keys.seal(header + entries.tobytes(), F.AD_PACK_HEADER)
    data = b"".join([*pack.blobs, sealed_header, F.PACK_TRAILER.pack(len(sealed_header))])
    # Chunks in flight stay readable, now from the sealed bytes: the blobs can go.
    view = memoryview(data)
    pack.blobs = [view[int(o) : int(o) + int(n)] for o, n in zip(offsets, lengths, strict=True)]
    return SealedPack(pack.number, pack_name(content_hash(data)), data, entries)


def parse_pack_tail(
    keys: MasterKeys, name: str, tail: bytes, pack_size: int
) -> npt.NDArray[np.void] | int:
    """Decode the header from the last bytes of a pack.

    Return the entries, or the number of tail bytes needed when ``tail`` is too short.
    Raise IntegrityError when the header is damaged.
    """
    trailer = F.PACK_TRAILER.size
    if len(tail) < trailer or pack_size < trailer:
        raise IntegrityError(f"reading pack {name} - truncated: {pack_size} bytes")
    (header_len,) = F.PACK_TRAILER.unpack_from(tail, len(tail) - trailer)
    if header_len + trailer > pack_size:
        raise IntegrityError(f"reading pack {name} - header length {header_len} beyond end")
    if header_len + trailer > len(tail):
        needed: int = header_len + trailer
        return needed
    start = len(tail) - trailer - header_len
    try:
        plain = keys.unseal(memoryview(tail)[start : len(tail) - trailer], F.AD_PACK_HEADER)
    except AuthenticationFailed as exc:
        raise IntegrityError(f"reading pack {name} header - authentication failed") from exc
    magic, version, count = F.PACK_HEADER_PREFIX.unpack_from(plain)
    if magic != F.PACK_HEADER_MAGIC:
        raise IntegrityError(f"reading pack {name} header - bad magic {magic!r}")
    if version > F.PACK_HEADER_VERSION:
        raise UnsupportedFormatError(f"reading pack {name} - header version {version}")
    body = memoryview(plain)[F.PACK_HEADER_PREFIX.size :]
    if len(body) != count * HEADER_ENTRY.itemsize:
        raise IntegrityError(f"reading pack {name} header - {count} entries do not fit")
    entries: npt.NDArray[np.void] = np.frombuffer(body, dtype=HEADER_ENTRY).copy()
    ends = entries["offset"].astype(np.uint64) + entries["stored"]
    if count and int(ends.max()) > pack_size - trailer - header_len:
        raise IntegrityError(f"reading pack {name} header - an entry points past the blobs")
    return entries
