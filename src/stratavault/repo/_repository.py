"""The repository: chunks in packs, index objects, snapshots, keys and locks on a Storage."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from stratavault.errors import (
    ChunkNotFoundError,
    Interrupted,
    ObjectExistsError,
    StorageError,
)
from stratavault.repo import (
    _collect,
    _formats as F,
    _immutable,
    _indexing,
    _keyring,
    _reading,
    _snapshots,
)
from stratavault.repo._crypto import (
    ChunkSealer,
    KdfParams,
    MasterKeys,
    blob_ad,
    compress,
    content_hash,
)
from stratavault.repo._frames import FRAMES_CACHED, Frame, FrameCache, is_framed, seal_frame
from stratavault.repo._index import (
    ChunkIndex,
    Entry,
    decode_index_object,
    encode_index_object,
    mark_held,
)
from stratavault.repo._keys import KeyInfo
from stratavault.repo._locks import EXCLUSIVE, PRUNE, SHARED, Locker
from stratavault.repo._open_packs import OpenPacks, staging_folder
from stratavault.repo._opening import Unlocked, create_repository, unlock_repository
from stratavault.repo._packs import OpenPack, SealedPack
from stratavault.repo._uploader import Uploader
from stratavault.repo._values import ChunkInfo, RepoStats
from stratavault.storage import Storage
from stratavault.types import CHUNK_ID_BYTES, BlobKind, ChunkId

_Located = tuple[str, Entry, bytes | None]
"""Where a chunk is: pack name, index entry, and its blob while its pack is being filled."""

__all__ = ["Repository"]

Clock = Callable[[], float]

ABANDON_GRACE_S = 2.0
"""How long Ctrl-C waits for the uploads in flight and the open packs (see ``abandon``)."""

LOOK_AGAIN_S = 1.0
"""A chunk found nowhere makes the repository list the plans and the index again, at most
this often (damage found by check or restore must not make it list them for every chunk)."""


@dataclass(frozen=True, slots=True)
class _Options:
    pack_target_bytes: int = F.PACK_TARGET_BYTES
    index_every_packs: int = F.INDEX_EVERY_PACKS
    uploader_threads: int = 2
    upload_queue: int = 1
    lock_refresh_s: float = F.LOCK_REFRESH_S


class Repository:
    """An encrypted, deduplicated chunk store on a :class:`Storage` (see docs/format.md).

    Thread-safe for chunk operations. Use as a context manager, or call :meth:`close`.
    Extra keyword-only options (for tests and tuning): ``clock``, ``pack_target_bytes``,
    ``index_every_packs``, ``uploader_threads``, ``upload_queue``, ``lock_refresh_s``.
    """

    def __init__(
        self,
        storage: Storage,
        config: dict[str, Any],
        keys: MasterKeys,
        key_name: str,
        cache_dir: Path | None,
        clock: Clock,
        options: _Options,
    ) -> None:
        self.storage = storage
        self.config = config
        self.id: str = config["id"]
        self._keys = keys
        self._key_name = key_name
        self._cache_dir = cache_dir / self.id if cache_dir is not None else None
        self._clock = clock
        self._opt = options
        self._lock = threading.Lock()
        self._index = ChunkIndex()
        self._index_objects: set[str] = set()
        self._cache_covers: set[str] | None = None
        """The index objects the local cache file was last loaded or saved with."""
        self._pending: ChunkIndex | None = None
        self._looked_again = -LOOK_AGAIN_S
        self._tree_windows = _reading.WindowCache()
        self._frames = FrameCache(FRAMES_CACHED)
        self._filling = OpenPacks(staging_folder(storage, cache_dir), options.pack_target_bytes)
        self._unindexed: list[tuple[str, Any]] = []
        self._error: BaseException | None = None
        self._closed = False
        self._uploader = Uploader(
            storage, keys, self._pack_done, self._pack_failed,
            threads=options.uploader_threads, queue_size=options.upload_queue,
        )  # fmt: skip
        self._locker = Locker(storage, keys, clock, options.lock_refresh_s)
        self._sync_index()

    # --- creating and opening -------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        storage: Storage,
        passphrase: bytes,
        *,
        cache_dir: Path | None,
        kdf: KdfParams | None = None,
        clock: Clock = time.time,
        immutable_days: int | None = None,
        copy_params_from: Repository | None = None,
        **options: Any,
    ) -> Repository:
        """Create a new repository on ``storage``; RepositoryExistsError if one is there.

        ``immutable_days``: every object but locks, index and plan objects is written
        with S3 object lock retention for that many days, now and at every later open
        (kept in the config; UsageError on a backend without object lock).
        ``copy_params_from``: share that repository's chunk-id key and chunker
        parameters (not its encryption key), so that copies between the two need not
        read the chunks the target has (docs/format.md, "Copies between repositories").
        """
        shared = None
        if copy_params_from is not None:
            shared = (copy_params_from.config, copy_params_from._keys)
        unlocked = create_repository(
            storage, passphrase, now=clock(), kdf=kdf, immutable_days=immutable_days, shared=shared
        )
        return cls.unlocked(storage, unlocked, cache_dir=cache_dir, clock=clock, **options)

    @classmethod
    def open(
        cls,
        storage: Storage,
        passphrase: bytes,
        *,
        cache_dir: Path | None,
        clock: Clock = time.time,
        **options: Any,
    ) -> Repository:
        """Open the repository on ``storage`` with any key slot ``passphrase`` unlocks."""
        unlocked = unlock_repository(storage, passphrase)
        return cls.unlocked(storage, unlocked, cache_dir=cache_dir, clock=clock, **options)

    @classmethod
    def unlocked(
        cls,
        storage: Storage,
        unlocked: Unlocked,
        *,
        cache_dir: Path | None,
        clock: Clock = time.time,
        **options: Any,
    ) -> Repository:
        """Open the repository on ``storage`` with what :func:`unlock_repository` found."""
        config, keys, name = unlocked.config, unlocked.keys, unlocked.key_name
        return cls(storage, config, keys, name, cache_dir, clock, _Options(**options))

    # --- chunks ---------------------------------------------------------------------------------

    def chunk_id(self, data: bytes | memoryview) -> ChunkId:
        """Keyed BLAKE3 of ``data``: the id under which it is stored."""
        return self._keys.chunk_id(data)

    def has_chunk(self, chunk_id: ChunkId) -> bool:
        """Whether the chunk is stored (or on its way into a pack in this session)."""
        with self._lock:
            return chunk_id in self._filling or chunk_id in self._index

    def missing_chunks(self, chunk_ids: list[ChunkId]) -> set[ChunkId]:
        """Those of ``chunk_ids`` that are neither stored nor on their way into a pack
        (``has_chunk`` for many ids at once, much cheaper per id)."""
        with self._lock:
            filling = self._filling
            unknown = [c for c in chunk_ids if c not in filling] if filling else chunk_ids
            return cast(set[ChunkId], self._index.missing(list(unknown)))

    def present_chunks(self, keys: npt.NDArray[np.bytes_]) -> npt.NDArray[np.bool_]:
        """``has_chunk`` for each 32-byte id of ``keys`` (an ``S32`` array), vectorized."""
        with self._lock:
            found = self._index.present(keys)
            if self._filling:
                mark_held(found, keys, self._filling)
            return found

    def add_chunk(
        self,
        chunk_id: ChunkId,
        data: bytes | memoryview,
        kind: BlobKind = BlobKind.DATA,
        *,
        level: int = 3,
    ) -> int:
        """Store a chunk unless present; return stored bytes added (0 for a duplicate).

        Compression and encryption run in the caller's thread; full packs are
        uploaded in the background. An earlier failed upload is raised here.
        """
        self._raise_failure()
        if self.has_chunk(chunk_id):
            return 0
        blob = self._keys.seal_blob(compress(data, level), blob_ad(kind, chunk_id))
        return self.add_sealed(chunk_id, blob, len(data), kind)

    def sealer(self) -> ChunkSealer:
        """What a worker process needs to hash, compress and encrypt chunks for this
        repository (it holds the keys: hand it only to this program's own processes)."""
        return ChunkSealer(self._keys)

    def add_chunks(
        self,
        chunks: list[tuple[ChunkId, memoryview]],
        kind: BlobKind = BlobKind.DATA,
        *,
        level: int = 3,
    ) -> tuple[int, int]:
        """Store those of ``chunks`` (``(id, data)``, neighbours on a disk) not present,
        compressed together in frames (of at most ``FRAME_MAX_MEMBERS``); return ``(chunks
        added, stored bytes added)``."""
        self._raise_failure()
        missing = self.missing_chunks([cid for cid, _ in chunks])
        new = list({cid: data for cid, data in chunks if cid in missing}.items())
        added = stored = 0
        for at in range(0, len(new), F.FRAME_MAX_MEMBERS):
            frame = new[at : at + F.FRAME_MAX_MEMBERS]
            if len(frame) == 1:
                size = self.add_chunk(frame[0][0], frame[0][1], kind, level=level)
                added, stored = added + (size > 0), stored + size
                continue
            blob = seal_frame(self._keys, int(kind), frame, level)
            n = self.add_sealed_frame([(cid, len(data)) for cid, data in frame], blob, kind)
            added, stored = added + n, stored + (len(blob) if n else 0)
        return added, stored

    def add_sealed(
        self,
        chunk_id: ChunkId,
        blob: bytes | bytearray,
        raw_len: int,
        kind: BlobKind = BlobKind.DATA,
    ) -> int:
        """Store a blob made by :meth:`ChunkSealer.seal` unless the chunk is present.

        Return stored bytes added (0 for a duplicate). An earlier failed upload is raised.
        """
        return len(blob) if self._append(kind, [(chunk_id, raw_len)], blob) else 0

    def add_sealed_frame(
        self,
        members: list[tuple[ChunkId, int]],
        blob: bytes | bytearray,
        kind: BlobKind = BlobKind.DATA,
    ) -> int:
        """Store a frame blob (``(chunk id, raw length)`` of its members) for those of its
        members not present; return how many that were (0: the frame is not stored)."""
        return self._append(kind | F.KIND_FRAMED, members, blob)

    def _append(
        self, kind: int, members: list[tuple[ChunkId, int]], blob: bytes | bytearray
    ) -> int:
        """Append a blob to the open pack of its kind, indexing the members not present."""
        self._raise_failure()
        with self._lock:
            new = [(c, r) for c, r in members if c not in self._filling and c not in self._index]
            if not new:
                return 0
            try:
                full = self._filling.append(kind, list(new), blob)
            except StorageError as exc:  # the pack's file: the repository cannot go on
                self._error = self._error or exc
                raise
        for pack in full:
            self._uploader.submit(pack)
        return len(new)

    def _locate(self, chunk_id: bytes) -> _Located:
        found = self._locate_many([chunk_id])[0]
        if found is None:
            raise self._not_found(chunk_id)
        return found

    def _locate_many(self, chunk_ids: Sequence[bytes]) -> list[_Located | None]:
        """Where each chunk is: ``(pack name, entry, blob when the pack is still in
        memory)``, ``None`` for one the repository lacks. Searches the open packs, then
        the index (vectorized), then packs a prune is about to delete."""
        located: list[_Located | None] = []
        with self._lock:
            for chunk_id in chunk_ids:
                found = self._filling.get(chunk_id)
                if found is None:
                    located.append(None)
                else:
                    pack, entry = found
                    name = f"(pack in memory #{pack.number})"
                    located.append((name, entry, pack.blob(chunk_id)))
        self._locate_stored(chunk_ids, located)
        if None in located and self._look_again():
            self._locate_stored(chunk_ids, located)
        return located

    def _locate_stored(self, chunk_ids: Sequence[bytes], located: list[_Located | None]) -> None:
        """Fill the ``None`` places of ``located`` from the index, then from the packs a
        prune is about to delete. (A pack moves from the open packs into the index under
        the lock, so a chunk not found open is found here.)"""
        with self._lock:
            _locate_in(self._index, chunk_ids, located)
        if None in located:
            _locate_in(self._pending_index(), chunk_ids, located)

    def _look_again(self) -> bool:
        """After a chunk was found neither in the index nor in packs a prune is deleting:
        list the plans, then the index, again (at most once a second); whether it did.

        A prune that puts packs back into the index (a backup beside an earlier prune used
        them) writes their index object before it removes the plan: a reader that read the
        index before the one and the plans after the other saw neither. Plans first, then
        the index, is the order that cannot miss both.
        """
        now = time.monotonic()
        with self._lock:
            if now - self._looked_again < LOOK_AGAIN_S:
                return False
            self._looked_again, self._pending = now, None
        self._pending_index()
        self._resync_index()
        return True

    def _not_found(self, chunk_id: bytes) -> ChunkNotFoundError:
        return ChunkNotFoundError(
            f"reading chunk {chunk_id.hex()} - not in the index of repository {self.id[:8]}"
        )

    def _pending_index(self) -> ChunkIndex:
        """Chunks of packs a prune took out of the index but has not deleted yet (see
        :func:`_collect.pending_index`); loaded once per session, when first needed."""
        with self._lock:
            if self._pending is not None:
                return self._pending
        pending = _collect.pending_index(self)
        with self._lock:
            self._pending = pending
        return pending

    @property
    def cache_dir(self) -> Path | None:
        """This repository's folder of local caches (``None``: caching is off)."""
        return self._cache_dir

    def index_objects(self) -> frozenset[str]:
        """Names of the index objects the chunk index holds. Backups only add to them;
        prune and ``repair index`` replace them, and only they can drop chunks."""
        with self._lock:
            return frozenset(self._index_objects)

    def indexed_packs(self) -> dict[str, int]:
        """The packs the index has entries for, each with the smallest size it can have
        (its last blob's end and the header's length field: a smaller pack is truncated)."""
        with self._lock:
            ends = self._index.pack_ends()
        return {name: end + F.PACK_TRAILER.size for name, end in ends.items()}

    def pack_header_ids(self, pack: str, size: int) -> set[ChunkId]:
        """The chunk ids the header of ``pack`` (``size`` bytes) lists, authenticated;
        ``DataDamagedError`` naming the damage when it cannot be read."""
        header = _reading.load_pack_header(self.storage, self._keys, pack, size)
        raw = header["id"].tobytes()  # not row by row: bytes() of an S32 drops trailing NULs
        return {ChunkId(raw[i : i + CHUNK_ID_BYTES]) for i in range(0, len(raw), CHUNK_ID_BYTES)}

    def chunk_info(self, chunk_id: ChunkId) -> ChunkInfo:
        """Pack name, offset, stored and raw length and kind of a chunk (a framed chunk's
        offset and stored length are its frame's)."""
        pack, entry, _ = self._locate(chunk_id)
        kind = BlobKind(entry.kind & ~F.KIND_FRAMED)
        return ChunkInfo(pack, entry.offset, entry.stored, entry.raw, kind)

    def chunks_by_pack(
        self, chunk_ids: Iterable[ChunkId], *, missing: list[ChunkId] | None = None
    ) -> dict[str, list[ChunkId]]:
        """The distinct ``chunk_ids`` grouped by the pack holding each (named as by
        :meth:`chunk_info`), in one vectorized index search. A chunk the repository lacks
        raises ``ChunkNotFoundError``, or is appended to ``missing`` when that is given."""
        wanted = list(dict.fromkeys(chunk_ids))
        by_pack: dict[str, list[ChunkId]] = {}
        for chunk_id, where in zip(wanted, self._locate_many(wanted), strict=True):
            if where is not None:
                by_pack.setdefault(where[0], []).append(chunk_id)
            elif missing is None:
                raise self._not_found(chunk_id)
            else:
                missing.append(chunk_id)
        return by_pack

    def read_chunk(self, chunk_id: ChunkId) -> bytes:
        """The plaintext of a chunk, verified; ChunkNotFoundError / IntegrityError."""
        return self._read_located(chunk_id, *self._locate(chunk_id))

    def read_chunk_and_mates(self, chunk_id: ChunkId) -> dict[ChunkId, bytes]:
        """The plaintext of ``chunk_id`` and, when it is stored in a frame, of the frame's
        other members (a reader that wants the neighbours next gets them from one read).
        The chunk is verified as by :meth:`read_chunk`; its mates as the frame is (their
        ids and lengths are in its authenticated table)."""
        pack, entry, blob = self._locate(chunk_id)
        if not is_framed(entry.kind):
            return {chunk_id: self._read_located(chunk_id, pack, entry, blob)}
        frame = self._frame(pack, entry, blob)
        return cast(dict[ChunkId, bytes], _reading.member_and_mates(frame, pack, chunk_id, entry))

    def _frame(self, pack: str, entry: Entry, blob: bytes | memoryview | None) -> Frame:
        """The decoded frame ``entry`` points into (``blob``: its bytes, None to read them)."""
        return _reading.cached_frame(self.storage, self._keys, self._frames, pack, entry, blob)

    def _read_located(
        self, chunk_id: ChunkId, pack: str, entry: Entry, blob: bytes | memoryview | None
    ) -> bytes:
        if is_framed(entry.kind):
            return _reading.member(self._frame(pack, entry, blob), pack, chunk_id, entry)
        if blob is None and entry.kind == BlobKind.TREE:
            blob = self._tree_windows.get(self.storage, pack, entry.offset, entry.stored)
        elif blob is None:
            blob = _reading.get_range(self.storage, pack, entry.offset, entry.stored)
        return _reading.open_blob(self._keys, pack, chunk_id, entry, blob)

    def read_chunks(self, chunk_ids: Iterable[ChunkId]) -> Iterator[tuple[ChunkId, bytes]]:
        """Yield each distinct chunk once, grouped by pack, with ranged reads of adjacent blobs."""
        located: dict[str, list[tuple[bytes, Entry]]] = {}
        memory: list[ChunkId] = []
        wanted_ids = list(dict.fromkeys(chunk_ids))
        for wanted, where in zip(wanted_ids, self._locate_many(wanted_ids), strict=True):
            if where is None:
                raise self._not_found(wanted)
            pack, entry, blob = where
            if blob is not None:
                memory.append(wanted)
            else:
                located.setdefault(pack, []).append((wanted, entry))
        for wanted in memory:
            yield wanted, self.read_chunk(wanted)
        for pack, entries in located.items():
            for found, data in _reading.read_pack_blobs(self.storage, self._keys, pack, entries):
                yield ChunkId(found), data

    # --- packs and index objects ----------------------------------------------------------------

    def _pack_done(self, sealed: SealedPack) -> None:
        with self._lock:
            self._index.add_pack(sealed.name, sealed.entries)
            self._filling.forget(bytes(c).ljust(32, b"\0") for c in sealed.entries["id"])
            self._unindexed.append((sealed.name, sealed.entries))
            batch: list[tuple[str, Any]] = []
            if len(self._unindexed) >= self._opt.index_every_packs:
                batch, self._unindexed = self._unindexed, []
        if batch:
            try:
                self._write_index(batch)
            except BaseException as exc:
                with self._lock:
                    self._error = self._error or exc

    def _pack_failed(self, pack: OpenPack, exc: BaseException) -> None:
        with self._lock:
            self._filling.forget(pack.ids)
            self._error = self._error or exc

    def _raise_failure(self) -> None:
        error = self._error
        if error is not None:
            raise error

    def _write_index(self, batch: list[tuple[str, Any]]) -> None:
        stored = self._keys.seal(compress(encode_index_object(batch), 3), F.AD_INDEX)
        name = F.INDEX_PREFIX + content_hash(stored)
        with suppress(ObjectExistsError):
            self.storage.put(name, stored)
        with self._lock:
            self._index_objects.add(name)

    def _read_index_object(self, name: str) -> tuple[list[str], Any]:
        plain = _reading.open_document(self.storage, self._keys, name, F.AD_INDEX)
        return decode_index_object(name, plain)

    def _sync_index(self) -> None:
        """Load the cached chunk index and bring it up to date with ``index/``."""
        _indexing.sync_index(self)

    def _save_cache(self) -> None:
        if self._cache_dir is None:
            return
        with self._lock:
            if self._unindexed or self._filling:
                return  # the cache must equal what the covered index objects say
            if self._cache_covers == self._index_objects:
                return  # it says this already (every flush comes here)
            self._index.save(self._cache_dir, self._index_objects)
            self._cache_covers = set(self._index_objects)

    def flush(self) -> None:
        """Seal the open packs, wait for uploads, and write index objects for them."""
        self._raise_failure()
        with self._lock:
            packs = self._filling.take_all()
        for pack in packs:
            self._uploader.submit(pack)
        self._uploader.wait()
        self._raise_failure()
        with self._lock:
            batch, self._unindexed = self._unindexed, []
        if batch:
            self._write_index(batch)
        self._save_cache()

    def damaged_index_names(self) -> list[str]:
        """Read and authenticate every index object (not the cache); return the damaged ones."""
        return _indexing.damaged_index_names(self)

    def rebuild_index(self) -> tuple[int, list[str], list[str]]:
        """Index every pack afresh from its own header, then delete the old index objects.

        Returns the number of packs indexed from their header, the names of packs whose
        header could not be read, and those of them whose entries in the old index were
        kept (the others' chunks are lost to the index). New index objects are written
        before old ones are removed, so a crash leaves at worst both. Pending deletions of
        prune are cancelled (their packs are indexed again). Hold the exclusive lock.
        """
        return _indexing.rebuild_index(self)

    def recover_unindexed_packs(self) -> int:
        """Index packs that no index object mentions (left by a crash); return their count."""
        return _indexing.recover_unindexed_packs(self)

    # --- snapshots ------------------------------------------------------------------------------

    def save_snapshot(self, document: dict[str, Any]) -> str:
        """Flush, then store ``document``; return the snapshot id (hex)."""
        self.flush()
        return _snapshots.save(self.storage, self._keys, document)

    def load_snapshot(self, snapshot_id: str) -> dict[str, Any]:
        """The document of snapshot ``snapshot_id``; SnapshotNotFoundError if absent."""
        return _snapshots.load(self.storage, self._keys, snapshot_id)

    def list_snapshots(
        self, damaged: list[tuple[str, str]] | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every snapshot as ``(id, document)``, in no given order. A damaged snapshot object
        raises DataDamagedError, or, with ``damaged`` given, is listed there and skipped."""
        return _snapshots.list_all(self.storage, self._keys, damaged)

    def resolve_snapshot_id(self, prefix: str) -> str:
        """The full id of the one snapshot whose id starts with ``prefix``."""
        return _snapshots.resolve(self.storage, prefix)

    def remove_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot object (its chunks stay until garbage collection)."""
        _snapshots.remove(self.storage, snapshot_id)

    # --- locks ----------------------------------------------------------------------------------

    @contextmanager
    def lock(self, *, exclusive: bool = False) -> Iterator[None]:
        """A shared (backup) or exclusive (maintenance) lock, refreshed while held.

        The index is read again once the lock is held: a prune running beside a backup
        relies on backups seeing only the index written after their lock (docs/format.md).
        """
        with self._locker.hold(EXCLUSIVE if exclusive else SHARED):
            self._resync_index()
            yield

    @contextmanager
    def prune_lock(self) -> Iterator[str]:
        """The lock prune holds: excludes other prunes and exclusive locks, not backups.
        Yields the lock's object name."""
        with self._locker.hold(PRUNE) as name:
            self._resync_index()
            yield name

    def refresh_index(self) -> None:
        """Read index objects written by other clients since this one last looked (call
        after listing snapshots to be sure every chunk they reference is known)."""
        self._resync_index()

    def _resync_index(self) -> None:
        with self._lock:
            busy = bool(self._filling or self._unindexed)
        if not busy:
            self._sync_index()

    # --- garbage collection (prune; the rule is in _gc.py and docs/format.md) -------------------

    @property
    def gc(self) -> _collect.GarbageCollector:
        """Prune's operations on this repository."""
        return _collect.GarbageCollector(self)

    def extend_retention(self, packs: Iterable[str]) -> int:
        """On an immutable repository: keep ``packs``, every snapshot, key slot and the config
        under object lock for ``immutable_days`` from now; the number of objects extended."""
        return _immutable.extend(self.storage, self.config, packs, self._clock())

    def break_stale_locks(self) -> int:
        """Remove locks of dead processes on this host and locks not refreshed for 30 min."""
        return self._locker.break_locks(stale_only=True)

    def break_locks(self) -> int:
        """Remove every lock."""
        return self._locker.break_locks(stale_only=False)

    # --- statistics, keys, closing --------------------------------------------------------------

    def stats(self) -> RepoStats:
        """Packs and their bytes (as listed), chunks and raw bytes (indexed), snapshots."""
        packs = pack_bytes = 0
        for obj in self.storage.list(F.DATA_PREFIX):
            packs += 1
            pack_bytes += obj.size_bytes
        with self._lock:
            chunks, raw_bytes, _ = self._index.totals()
        snapshots = sum(1 for _ in self.storage.list(F.SNAPSHOTS_PREFIX))
        return RepoStats(packs, pack_bytes, chunks, raw_bytes, snapshots)

    def list_keys(self) -> list[KeyInfo]:
        """Every key slot; ``current`` marks the one this repository was opened with."""
        return _keyring.list_slots(self.storage, self._key_name)

    def add_key(self, passphrase: bytes, *, kdf: KdfParams | None = None) -> str:
        """Add a key slot for ``passphrase``; return its id."""
        name = _keyring.write_slot(
            self.storage, self._keys, passphrase, self.id, kdf, self._clock()
        )
        return name.removeprefix(F.KEYS_PREFIX)

    def remove_key(self, key_id: str) -> None:
        """Remove a key slot; refuses the slot in use and the last slot."""
        _keyring.remove_slot(self.storage, key_id, self._key_name)

    def change_passphrase(self, new_passphrase: bytes, *, kdf: KdfParams | None = None) -> str:
        """Add a slot for ``new_passphrase``, then remove the current one; return the new id."""
        old = self._key_name
        new_id = self.add_key(new_passphrase, kdf=kdf)
        self._key_name = F.KEYS_PREFIX + new_id
        _keyring.remove_slot(self.storage, old.removeprefix(F.KEYS_PREFIX), self._key_name)
        return new_id

    def close(self) -> None:
        """Flush (unless an upload failed), stop the uploader threads, save the cache."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._error is None:
                self.flush()
        finally:
            self._uploader.close()
            with self._lock:
                for pack in self._filling.take_all():  # not flushed: an upload failed
                    pack.file.remove()

    def __enter__(self) -> Repository:
        return self

    def abandon(self, grace_s: float = ABANDON_GRACE_S) -> None:
        """Stop soon (Ctrl-C): flush as :meth:`close` does, but wait at most ``grace_s``
        for it. What has not landed by then is not waited for (the uploads go on in
        daemon threads until the process ends; a put is atomic): the next backup indexes
        the packs that landed from their headers and uploads the rest again, as after a
        crash. Flushing to the end took minutes at a low ``--limit-upload``."""
        if self._closed:
            return
        self._closed = True

        def finish() -> None:
            with suppress(Exception):  # the command fails with the interrupt already
                self.flush()

        finisher = threading.Thread(target=finish, name="stratavault-abandon", daemon=True)
        finisher.start()
        finisher.join(grace_s)

    def settle(self, failure: BaseException) -> None:
        """After a job failed: on Ctrl-C :meth:`abandon`, else :meth:`flush` (what was
        uploaded gets indexed, so the next backup reuses it)."""
        if _interrupted(failure):
            self.abandon()
        else:
            self.flush()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and _interrupted(exc):
            self.abandon()
        else:
            self.close()


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C (or SIGTERM) ending a job."""
    return isinstance(exc, (KeyboardInterrupt, Interrupted))


def _locate_in(index: ChunkIndex, ids: Sequence[bytes], located: list[_Located | None]) -> None:
    """Fill the ``None`` places of ``located`` with the chunks ``index`` holds."""
    rest = [i for i, where in enumerate(located) if where is None]
    for i, entry in zip(rest, index.lookup_many([ids[i] for i in rest]), strict=True):
        if entry is not None:
            located[i] = (index.packs[entry.pack], entry, None)
