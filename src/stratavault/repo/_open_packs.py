"""The packs a repository is filling, and the chunks not yet on the backend."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

from stratavault.repo import _formats as F
from stratavault.repo._index import Entry
from stratavault.repo._packs import OpenPack, PackFile
from stratavault.storage import Storage

__all__ = ["OpenPacks", "staging_folder"]


class OpenPacks:
    """The pack being filled per blob kind, and every chunk in it or in a full pack on its
    way to the backend (until the pack is indexed). Trees go into packs of their own, so
    the trees of a snapshot sit together and browsing or an incremental backup reads little
    (restic does the same). Not thread-safe: the repository calls it under its lock."""

    def __init__(self, folder: str, target_bytes: int) -> None:
        self._folder, self._target_bytes = folder, target_bytes
        self._open: dict[int, OpenPack] = {}
        self._chunks: dict[bytes, tuple[OpenPack, Entry]] = {}
        self._next_number = 0

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._chunks

    def __bool__(self) -> bool:
        """Whether some chunk is not on the backend and indexed yet."""
        return bool(self._chunks)

    def get(self, chunk_id: bytes) -> tuple[OpenPack, Entry] | None:
        """The pack holding a chunk not indexed yet, and its entry (pack number -1)."""
        return self._chunks.get(chunk_id)

    def append(
        self, kind: int, members: list[tuple[bytes, int]], blob: bytes | bytearray
    ) -> list[OpenPack]:
        """Add a blob holding ``members`` (``(chunk id, raw length)``, none of them stored
        yet) to the pack of its kind; return the packs that are full now (they leave the
        open packs: upload them). A pack is full before a blob would take it past the
        target size, header included, and once it reaches that size; only a pack of a
        single blob is larger. Each pack is filled in a file of its own in ``folder``."""
        base = kind & ~F.KIND_FRAMED
        full: list[OpenPack] = []
        pack = self._open.get(base)
        if pack is not None and pack.sealed_bytes(len(blob), len(members)) > self._target_bytes:
            full.append(self._open.pop(base))
            pack = None
        if pack is None:
            pack = self._open[base] = OpenPack(self._next_number, PackFile(self._folder))
            self._next_number += 1
        offset = pack.append_frame(members, kind, blob)
        for chunk_id, raw_len in members:
            self._chunks[chunk_id] = (pack, Entry(-1, kind, offset, len(blob), raw_len))
        if pack.sealed_bytes() >= self._target_bytes:
            full.append(self._open.pop(base))
        return full

    def forget(self, chunk_ids: Iterable[bytes]) -> None:
        """The chunks' pack is indexed now, or failed to upload."""
        for chunk_id in chunk_ids:
            self._chunks.pop(chunk_id, None)

    def take_all(self) -> list[OpenPack]:
        """The open packs that hold something (they leave the open packs: upload them)."""
        packs, self._open = [p for p in self._open.values() if p.count], {}
        return packs


def staging_folder(storage: Storage, cache_dir: Path | None) -> str:
    """Where packs are filled: the backend's staging folder (a local repository's own
    folder: a pack is then stored without a copy), else the local cache, else the system's
    temporary folder."""
    if storage.properties.staging_dir is not None:
        return storage.properties.staging_dir
    if cache_dir is not None:
        with contextlib.suppress(OSError):
            cache_dir.mkdir(parents=True, exist_ok=True)
            return str(cache_dir)
    return tempfile.gettempdir()
