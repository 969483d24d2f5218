"""Pack objects: many encrypted blobs, then an encrypted header, then its plain length."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from dataclasses import dataclass, field

import blake3
import numpy as np
import numpy.typing as npt

from stratavault.errors import (
    IntegrityError,
    StorageError,
    StorageFullError,
    UnsupportedFormatError,
)
from stratavault.repo import _formats as F
from stratavault.repo._crypto import AuthenticationFailed, MasterKeys
from stratavault.repo._dtypes import HEADER_ENTRY
from stratavault.storage import TEMP_PREFIX

__all__ = [
    "OpenPack",
    "PackFile",
    "SealedPack",
    "pack_name",
    "parse_pack_tail",
    "seal_pack",
]


class PackFile:
    """The bytes of a pack while it is filled and uploaded, kept in a local file instead of
    memory (a pack is 16 MiB, and several are in flight at once). The file is anonymous
    where the file system allows (``O_TMPFILE``: nothing is left behind by a crash), else
    named with ``TEMP_PREFIX`` (which backends skip when listing). Thread-safe."""

    def __init__(self, folder: str) -> None:
        self.length = 0
        """Bytes written so far."""
        self._on_disk = 0
        self._pending = bytearray()
        """Small blobs not written yet (a system call per blob would cost more than the
        copy: a first backup adds ~50,000 blobs of small files)."""
        self._lock = threading.Lock()
        self._hasher = blake3.blake3(max_threads=1)
        self._failed: StorageError | None = None
        self._folder = folder
        try:
            self._fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
            self._named: str | None = None
        except (OSError, AttributeError):  # no O_TMPFILE here: a named file
            self._named = os.path.join(folder, f"{TEMP_PREFIX}pack-{secrets.token_hex(8)}")
            try:
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                self._fd = os.open(self._named, flags, 0o666)
            except OSError as e:
                raise _file_error(f"creating a pack file in {folder}", e) from e

    @property
    def path(self) -> str:
        """A path that opens the file (``/proc/self/fd/N`` for an anonymous one); what was
        written is in the file."""
        with self._lock:
            self._flush()
        return self._named or f"/proc/self/fd/{self._fd}"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``."""
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if len(self._pending) + len(data) < _WRITE_BYTES:
                self._pending += data
            else:
                self._flush()
                self._write(data)
            self.length += len(data)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (written before)."""
        with self._lock:
            self._flush()
            return os.pread(self._fd, length, offset)

    def content_hash(self) -> str:
        """:func:`content_hash` of what was written (hashed as it was written)."""
        with self._lock:
            self._flush()
            return self._hasher.hexdigest()

    def remove(self) -> None:
        """Close and delete the file (once the pack is stored, or given up)."""
        with self._lock:
            fd, self._fd = self._fd, -1
            self._pending = bytearray()
        if fd >= 0:
            os.close(fd)
        if self._named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._named)

    def _flush(self) -> None:
        if self._pending:
            self._write(self._pending)
            self._pending.clear()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Write at the end; after a failure the file is broken: every later call raises
        the same error (the pack is given up)."""
        if self._failed is not None:
            raise self._failed
        done = 0
        with memoryview(data) as whole, whole.cast("B") as flat:  # released on errors too
            try:
                while done < len(flat):
                    done += os.pwrite(self._fd, flat[done:], self._on_disk + done)
            except OSError as e:
                self._failed = _file_error(f"writing a pack file in {self._folder}", e)
        if self._failed is not None:
            raise self._failed
        self._on_disk += done
        self._hasher.update(data)


_WRITE_BYTES = 1 << 20
"""Blobs are gathered up to this size before they are written."""


def _file_error(doing: str, e: OSError) -> StorageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"{doing} - no space left ({e.strerror})")
    return StorageError(f"{doing} - {e.strerror or e}")


@dataclass(slots=True)
class OpenPack:
    """A pack being filled: its bytes so far (in a :class:`PackFile`) plus the header
    records of its blobs."""

    number: int
    file: PackFile
    ids: list[bytes] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    raws: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    storeds: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes of the blobs so far."""
        return self.file.length

    @property
    def count(self) -> int:
        """Number of blobs."""
        return len(self.ids)

    def sealed_bytes(self, blob_bytes: int = 0, members: int = 0) -> int:
        """Size of the sealed pack (blobs, encrypted header, trailer) once a blob of
        ``blob_bytes`` holding ``members`` chunks is added."""
        entries = (len(self.ids) + members) * HEADER_ENTRY.itemsize
        header = F.ENVELOPE_OVERHEAD + F.PACK_HEADER_PREFIX.size + entries
        return self.file.length + blob_bytes + header + F.PACK_TRAILER.size

    def append(
        self, chunk_id: bytes, kind: int, blob: bytes | bytearray | memoryview, raw_len: int
    ) -> int:
        """Add an encrypted blob; return its offset in the pack."""
        return self.append_frame([(chunk_id, raw_len)], kind, blob)

    def append_frame(
        self, members: list[tuple[bytes, int]], kind: int, blob: bytes | bytearray | memoryview
    ) -> int:
        """Add a blob holding ``members`` (``(chunk id, raw length)``; ``kind`` has
        ``KIND_FRAMED`` when there are several); return its offset in the pack."""
        offset = self.file.length
        self.file.write(blob)
        for chunk_id, raw_len in members:
            self.ids.append(chunk_id)
            self.kinds.append(kind)
            self.raws.append(raw_len)
            self.offsets.append(offset)
            self.storeds.append(len(blob))
        return offset

    def blob(self, chunk_id: bytes) -> bytes | None:
        """The stored blob of ``chunk_id`` (its frame's, for a framed chunk) if it is in
        this pack (linear; packs are small)."""
        for i, cid in enumerate(self.ids):
            if cid == chunk_id:
                return self.file.read(self.offsets[i], self.storeds[i])
        return None


@dataclass(frozen=True, slots=True)
class SealedPack:
    """A finished pack: its object name, bytes and header entries."""

    number: int
    name: str
    file: PackFile
    entries: npt.NDArray[np.void]


def pack_name(hex_hash: str) -> str:
    """Object name of the pack whose content hash is ``hex_hash``."""
    return f"{F.DATA_PREFIX}{hex_hash[:2]}/{hex_hash}"


def seal_pack(keys: MasterKeys, pack: OpenPack) -> SealedPack:
    """Finish the pack in its file: append the encrypted header and its length; name it
    by its hash."""
    count = pack.count
    entries = np.zeros(count, dtype=HEADER_ENTRY)
    entries["kind"] = pack.kinds
    entries["id"] = pack.ids
    entries["offset"] = pack.offsets
    entries["stored"] = pack.storeds
    entries["raw"] = pack.raws
    header = F.PACK_HEADER_PREFIX.pack(F.PACK_HEADER_MAGIC, F.PACK_HEADER_VERSION, count)
    sealed_header = keys.seal(header + entries.tobytes(), F.AD_PACK_HEADER)
    pack.file.write(sealed_header + F.PACK_TRAILER.pack(len(sealed_header)))
    return SealedPack(pack.number, pack_name(pack.file.content_hash()), pack.file, entries)


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
