"""Keys, authenticated encryption and the per-object codec (compression)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

if TYPE_CHECKING:  # imported on first use: opening a repository needs no codec
    import zstandard

from stratavault.repo import _formats as F
from stratavault.types import BlobKind, ChunkId

__all__ = [
    "AuthenticationFailed",
    "ChunkSealer",
    "DerivedKeys",
    "KdfParams",
    "MasterKeys",
    "compress",
    "decompress",
]


class AuthenticationFailed(Exception):
    """Internal: an envelope did not authenticate (callers turn it into a named error)."""


class DerivedKeys(Protocol):
    """A memory of key derivations that opened a key slot (the host agent's, which spares
    each command its ~0.1 s of Argon2id). It only saves recomputing a pure function of
    its arguments: a changed or removed slot has another salt, so nothing it holds opens
    a slot the passphrase no longer opens."""

    def get(self, kdf: KdfParams, salt: bytes, passphrase: bytes) -> bytes | None:
        """The key ``kdf`` derives from ``passphrase`` and ``salt``, if remembered."""

    def put(self, kdf: KdfParams, salt: bytes, passphrase: bytes, key: bytes) -> None:
        """Remember a derivation that opened a slot."""


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost parameters of one key slot (stored in the slot).

    The defaults make 6 passes over 32 MiB: the memory-time product of RFC 9106's
    t=3, m=64 MiB (four times OWASP's minimum), and about the same time (~0.09 s
    here), with half the memory. Every command derives a key once, while its other
    memory is in use, so the KDF's memory is part of every command's peak; restic's
    scrypt defaults use 32 MiB too."""

    time_cost: int = 6
    memory_kib: int = 32 * 1024
    parallelism: int = 2

    @classmethod
    def fast(cls) -> KdfParams:
        """Cheap parameters for tests; never use them for a real repository."""
        return cls(time_cost=1, memory_kib=8, parallelism=1)

    def derive(self, passphrase: bytes, salt: bytes) -> bytes:
        """Derive a 32-byte wrapping key from ``passphrase`` and ``salt``."""
        return Argon2id(
            salt=salt,
            length=F.KEY_BYTES,
            iterations=self.time_cost,
            lanes=self.parallelism,
            memory_cost=self.memory_kib,
        ).derive(passphrase)

    def to_json(self) -> dict[str, Any]:
        """The parameters as stored in a key file."""
        return {
            "algorithm": F.KDF_ALGORITHM,
            "time_cost": self.time_cost,
            "memory_kib": self.memory_kib,
            "parallelism": self.parallelism,
        }


def seal(aead: AESGCM, plaintext: bytes | memoryview, ad: bytes) -> bytearray:
    """Encrypt into ``nonce || ciphertext || tag`` with a random nonce (the buffer it was
    encrypted into: a copy as ``bytes`` would double a 4 MiB chunk's memory for a moment)."""
    nonce = os.urandom(F.NONCE_BYTES)
    out = bytearray(F.NONCE_BYTES + len(plaintext) + F.TAG_BYTES)
    out[: F.NONCE_BYTES] = nonce
    aead.encrypt_into(nonce, plaintext, ad, memoryview(out)[F.NONCE_BYTES :])
    return out


def unseal(aead: AESGCM, envelope: bytes | memoryview, ad: bytes) -> bytes:
    """Decrypt an envelope made by :func:`seal`; raise AuthenticationFailed if it is not genuine."""
    view = memoryview(envelope)
    if len(view) < F.ENVELOPE_OVERHEAD:
        raise AuthenticationFailed("envelope too short")
    try:
        return aead.decrypt(view[: F.NONCE_BYTES], view[F.NONCE_BYTES :], ad)
    except InvalidTag as exc:
        raise AuthenticationFailed("authentication tag mismatch") from exc


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        import zstandard

        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def compress(data: bytes | memoryview, level: int) -> bytes:
    """Return ``codec byte || payload``: zstd when it saves >3 %, else the raw bytes."""
    raw_len = len(data)
    packed = _compressor(level).compress(data)
    if len(packed) < raw_len * F.COMPRESSED_MAX_RATIO:
        return bytes((F.CODEC_ZSTD,)) + packed
    return bytes((F.CODEC_RAW,)) + data  # one copy


def decompress(plaintext: bytes, max_bytes: int = 1 << 31) -> bytes:
    """Inverse of :func:`compress`; raise ValueError on an unknown codec or bad payload."""
    if not plaintext:
        raise ValueError("empty plaintext (no codec byte)")
    codec = plaintext[0]
    if codec == F.CODEC_RAW:
        return plaintext[1:]
    if codec == F.CODEC_ZSTD:
        import zstandard  # ~0.3 us once loaded: nothing beside a chunk's decompression

        dec: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
        if dec is None:
            dec = _local.decompressor = zstandard.ZstdDecompressor()
        try:
            out: bytes = dec.decompress(memoryview(plaintext)[1:], max_output_size=max_bytes)
        except zstandard.ZstdError as exc:
            raise ValueError(f"zstd payload is corrupt: {exc}") from exc
        return out
    raise ValueError(f"unknown codec byte {codec}")


class MasterKeys:
    """The repository's secret keys: AES-256-GCM key and BLAKE3 chunk-id key."""

    __slots__ = ("_aead", "_id_key", "material")

    def __init__(self, material: bytes) -> None:
        if len(material) != 2 * F.KEY_BYTES:
            raise ValueError("master key material must be 64 bytes")
        self.material = material
        self._aead = AESGCM(material[: F.KEY_BYTES])
        self._id_key = material[F.KEY_BYTES :]

    @classmethod
    def generate(cls) -> MasterKeys:
        """Fresh random keys for a new repository."""
        return cls(os.urandom(2 * F.KEY_BYTES))

    def chunk_id(self, data: bytes | memoryview) -> ChunkId:
        """Keyed BLAKE3 of ``data`` (the GIL is released for large inputs)."""
        # blake3-py releases the GIL while hashing large inputs.
        return ChunkId(blake3.blake3(data, key=self._id_key).digest())

    def seal(self, plaintext: bytes | memoryview, ad: bytes) -> bytes:
        """Encrypt and authenticate with the repository key."""
        return bytes(seal(self._aead, plaintext, ad))

    def seal_blob(self, plaintext: bytes | memoryview, ad: bytes) -> bytearray:
        """:meth:`seal` into a buffer that is not copied again (a blob of up to 4 MiB on
        its way into a pack)."""
        return seal(self._aead, plaintext, ad)

    def __reduce__(self) -> tuple[type[MasterKeys], tuple[bytes]]:
        # Picklable so that a worker process started by this one can seal chunks.
        return (MasterKeys, (self.material,))

    def unseal(self, envelope: bytes | memoryview, ad: bytes) -> bytes:
        """Decrypt and verify; raise AuthenticationFailed if not genuine."""
        return unseal(self._aead, envelope, ad)


def blob_ad(kind: int, chunk_id: bytes) -> bytes:
    """Associated data binding a blob to its kind and chunk id."""
    return F.AD_BLOB + bytes((kind,)) + chunk_id


def content_hash(data: bytes | memoryview) -> str:
    """Unkeyed BLAKE3 hex of stored bytes: the name of packs, index objects and snapshots."""
    return blake3.blake3(data, max_threads=1).hexdigest()


class ChunkSealer:
    """Chunk ids and sealed blobs for one repository, usable in another process."""

    def __init__(self, keys: MasterKeys) -> None:
        self._keys = keys

    def chunk_id(self, data: bytes | memoryview) -> ChunkId:
        """Keyed BLAKE3 of ``data``, as :meth:`Repository.chunk_id`."""
        return self._keys.chunk_id(data)

    def seal(
        self, chunk_id: ChunkId, data: bytes | memoryview, kind: BlobKind, level: int
    ) -> bytearray:
        """The stored form of a chunk: compressed (or raw), encrypted, bound to its id."""
        return self._keys.seal_blob(compress(data, level), blob_ad(kind, chunk_id))
