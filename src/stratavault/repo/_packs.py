"""Pack objects: many encrypted blobs, then an encrypted header, then its plain length."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stratavault.errors import IntegrityError, UnsupportedFormatError
from stratavault.repo import _formats as F
from stratavault.repo._crypto import AuthenticationFailed, MasterKeys, content_hash
from stratavault.repo._dtypes import HEADER_ENTRY

__all__ = [
    "OpenPack",
    "PackBuffers",
    "SealedPack",
    "pack_name",
    "parse_pack_tail",
    "seal_pack",
]


@dataclass(slots=True)
class OpenPack:
    """A pack being filled: its bytes so far (one buffer, so sealing copies nothing) plus
    the header records of its blobs. ``data`` may be a buffer used before and longer than
    the pack: only its first ``length`` bytes are the pack's."""

    number: int
    data: bytearray = field(default_factory=bytearray)
    length: int = 0
    ids: list[bytes] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    raws: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    storeds: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes of the blobs so far."""
        return self.length

    @property
    def count(self) -> int:
        """Number of blobs."""
        return len(self.ids)

    def sealed_bytes(self, blob_bytes: int = 0, members: int = 0) -> int:
        """Size of the sealed pack (blobs, encrypted header, trailer) once a blob of
        ``blob_bytes`` holding ``members`` chunks is added."""
        entries = (len(self.ids) + members) * HEADER_ENTRY.itemsize
        header = F.ENVELOPE_OVERHEAD + F.PACK_HEADER_PREFIX.size + entries
        return self.length + blob_bytes + header + F.PACK_TRAILER.size

    def append(self, chunk_id: bytes, kind: int, blob: bytes | memoryview, raw_len: int) -> int:
        """Add an encrypted blob (copied into the pack); return its offset in the pack."""
        return self.append_frame([(chunk_id, raw_len)], kind, blob)

    def append_frame(
        self, members: list[tuple[bytes, int]], kind: int, blob: bytes | memoryview
    ) -> int:
        """Add a blob holding ``members`` (``(chunk id, raw length)``; ``kind`` has
        ``KIND_FRAMED`` when there are several); return its offset in the pack."""
        offset = self.length
        self._write(blob)
        for chunk_id, raw_len in members:
            self.ids.append(chunk_id)
            self.kinds.append(kind)
            self.raws.append(raw_len)
            self.offsets.append(offset)
            self.storeds.append(len(blob))
        return offset

    def _write(self, data: bytes | memoryview) -> None:
        end = self.length + len(data)
        self.data[self.length : end] = data  # in place while the buffer is long enough
        self.length = end

    def blob(self, chunk_id: bytes) -> bytes | None:
        """A copy of the stored blob of ``chunk_id`` (its frame's, for a framed chunk) if it
        is in this pack (linear; packs are small). A copy: the buffer may still grow."""
        for i, cid in enumerate(self.ids):
            if cid == chunk_id:
                return bytes(self.data[self.offsets[i] : self.offsets[i] + self.storeds[i]])
        return None


class PackBuffers:
    """Buffers of uploaded data packs, kept to fill the next ones: a fresh buffer grows to
    16 MiB, mapped anew and every page of it faulted in (the mmap threshold is 8 MiB),
    4,096 page faults per pack. At most ``keep`` are kept; thread-safe."""

    def __init__(self, keep: int = 2) -> None:
        self._keep = keep
        self._spare: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        """A buffer for a new pack (its old bytes are overwritten as the pack fills)."""
        with self._lock:
            return self._spare.pop() if self._spare else bytearray()

    def give(self, buffer: bytearray) -> None:
        """Keep the buffer of a pack whose upload is done, unless some view of it is still
        alive (then it cannot change size, and must not be overwritten either)."""
        if not buffer:
            return
        try:  # a resize fails while views are alive; shrinking first never reallocates
            buffer.append(buffer.pop())
        except BufferError:
            return
        with self._lock:
            if len(self._spare) < self._keep:
                self._spare.append(buffer)


@dataclass(frozen=True, slots=True)
class SealedPack:
    """A finished pack: its object name, bytes and header entries."""

    number: int
    name: str
    data: memoryview
    entries: npt.NDArray[np.void]


def pack_name(hex_hash: str) -> str:
    """Object name of the pack whose content hash is ``hex_hash``."""
    return f"{F.DATA_PREFIX}{hex_hash[:2]}/{hex_hash}"


def seal_pack(keys: MasterKeys, pack: OpenPack) -> SealedPack:
    """Finish the pack in place: append the encrypted header and its length; name it by
    its hash. The pack's buffer becomes the sealed pack's bytes (nothing is copied)."""
    count = pack.count
    entries = np.zeros(count, dtype=HEADER_ENTRY)
    entries["kind"] = pack.kinds
    entries["id"] = pack.ids
    entries["offset"] = pack.offsets
    entries["stored"] = pack.storeds
    entries["raw"] = pack.raws
    header = F.PACK_HEADER_PREFIX.pack(F.PACK_HEADER_MAGIC, F.PACK_HEADER_VERSION, count)
    sealed_header = keys.seal(header + entries.tobytes(), F.AD_PACK_HEADER)
    pack._write(sealed_header)
    pack._write(F.PACK_TRAILER.pack(len(sealed_header)))
    data = memoryview(pack.data)[: pack.length]
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
