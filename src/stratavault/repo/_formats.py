"""Every magic number, version and object name prefix of the repository format.

PLEASE DO NOT MODIFY existing values: repositories written with them must stay
readable. Add new values with a new version. ``docs/format.md`` is the reference
that explains each of them byte by byte.
"""

from __future__ import annotations

import struct
from typing import Final

# --- versions -----------------------------------------------------------------------------------
FORMAT_VERSION: Final = 1
"""Repository format version written into ``config``; newer versions are refused."""
KEY_FILE_VERSION: Final = 1
PACK_HEADER_VERSION: Final = 1
INDEX_VERSION: Final = 1

# --- object names -------------------------------------------------------------------------------
CONFIG_NAME: Final = "config"
KEYS_PREFIX: Final = "keys/"
DATA_PREFIX: Final = "data/"
INDEX_PREFIX: Final = "index/"
SNAPSHOTS_PREFIX: Final = "snapshots/"
LOCKS_PREFIX: Final = "locks/"
GC_PREFIX: Final = "gc/"
"""Pending deletions of prune (garbage collection plans), see docs/format.md."""
GC_PLAN_VERSION: Final = 1

# --- cryptography -------------------------------------------------------------------------------
KEY_BYTES: Final = 32
"""AES-256 key length and BLAKE3 key length."""
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
ENVELOPE_OVERHEAD: Final = NONCE_BYTES + TAG_BYTES
SALT_BYTES: Final = 16
KDF_ALGORITHM: Final = "argon2id"

# Associated data (AD) of each kind of encrypted object; a blob's AD also carries kind + chunk id.
AD_BLOB: Final = b"stratavault/blob/v1\x00"
AD_PACK_HEADER: Final = b"stratavault/pack-header/v1\x00"
AD_INDEX: Final = b"stratavault/index/v1\x00"
AD_SNAPSHOT: Final = b"stratavault/snapshot/v1\x00"
AD_LOCK: Final = b"stratavault/lock/v1\x00"
AD_KEY: Final = b"stratavault/key/v1\x00"
AD_GC_PLAN: Final = b"stratavault/gc-plan/v1\x00"
AD_FRAME: Final = b"stratavault/frame/v1\x00"
"""A frame's AD also carries its kind byte (with ``KIND_FRAMED``); its members' ids are in
its authenticated plaintext."""

# --- codec byte: first byte of every plaintext that may be compressed ---------------------------
CODEC_RAW: Final = 0
CODEC_ZSTD: Final = 1
COMPRESSED_MAX_RATIO: Final = 0.97
"""Compressed data is kept only when smaller than this fraction of the raw size."""

# --- frames: several chunks compressed together in one blob ------------------------------------
KIND_FRAMED: Final = 0x80
"""Set in the kind byte of header and index entries of chunks that live in a frame; every
member of a frame has the frame's offset and stored length, and its own raw length."""
FRAME_COUNT: Final = struct.Struct("<H")
"""A frame's plaintext: member count, then per member FRAME_MEMBER, then codec byte + payload
of the members' bytes one after another."""
FRAME_MEMBER: Final = struct.Struct("<32sI")
"""chunk id, raw length"""
FRAME_MAX_MEMBERS: Final = 64

# --- packs --------------------------------------------------------------------------------------
PACK_TARGET_BYTES: Final = 16 * 1024 * 1024
PACK_HEADER_MAGIC: Final = b"SVPH"
PACK_TRAILER: Final = struct.Struct("<I")
"""Plain length of the encrypted header, the last 4 bytes of a pack."""
PACK_TAIL_READ_BYTES: Final = 256 * 1024
"""How much of a pack's end recovery reads first (header + trailer usually fit)."""

# --- index objects ------------------------------------------------------------------------------
INDEX_MAGIC: Final = b"SVIX"
INDEX_EVERY_PACKS: Final = 64
"""During a long backup, write an index object after this many finished packs."""

# --- locks --------------------------------------------------------------------------------------
LOCK_STALE_S: Final = 30 * 60
LOCK_REFRESH_S: Final = 5 * 60

# --- binary records (numpy dtypes, little-endian, packed) ---------------------------------------
PACK_HEADER_PREFIX: Final = struct.Struct("<4sBI")
"""magic, version, entry count; followed by ``count`` HEADER_ENTRY records."""
INDEX_PREFIX_STRUCT: Final = struct.Struct("<4sBI")
"""magic, version, pack count; followed by 32-byte pack hashes, a u32 entry count, entries."""
COUNT: Final = struct.Struct("<I")
