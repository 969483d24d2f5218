"""Use case: copy snapshots from one repository to another (offsite copies, seeding).

Each repository has its own encryption key, so every chunk that travels is read,
authenticated and decrypted from the source, and compressed and encrypted again for the
target. Chunk ids are keyed per repository:

- **shared chunk-id key** (the target was made with ``init --copy-params-from`` the source,
  or the other way round): ids are the same on both sides, so a chunk the target already
  has is never read; trees and disk indexes keep their bytes and ids;
- **different keys**: every data chunk of a snapshot is read from the source to compute
  its id in the target (only the missing ones are stored), and trees and disk index
  segments are written again with the new ids.

Chunks that come one after another from the source (neighbours in its packs: a disk's
chunks in disk order) are compressed together in frames in the target, as a disk backup
stores them, so a copy is about as small as its original.

A copied snapshot document is the original's with the new tree and disk segments, its
``parent`` translated (or dropped), and ``original``: the id of the snapshot it is a copy
of (the source's own ``original`` if it is itself a copy), as restic does. Snapshots the
target already holds a copy of are skipped. An interrupted copy loses nothing: the target
indexes the packs that landed (``recover_unindexed_packs``) and the next run reuses them;
each snapshot is saved after all its data, as a backup does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from stratavault._defaults import DEFAULT_DISK_FRAME_BYTES
from stratavault.jobs._progress import Cancellation, NullProgress, Progress, ProgressState, Ticker
from stratavault.repo import Repository
from stratavault.snapshot import (
    DiskIndex,
    DiskRef,
    Snapshot,
    content_runs,
    load_disk_index,
    load_snapshots,
    load_tree_docs,
    save_disk_index,
    save_tree_docs,
    select_snapshots,
)
from stratavault.types import BlobKind, ChunkId

__all__ = ["CopyOptions", "CopyResult", "copy_snapshots", "shares_chunk_ids"]

_PROBE = b"stratavault/copy: do these repositories share the chunk-id key?"
_BATCH_CHUNKS = 256
"""Chunks read from the source per task (grouped by pack inside the task)."""


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """Which snapshots to copy: ``snapshot_ids`` (unique id prefixes), else every one
    matching the filters (``hosts``, ``tags``, ``paths`` as for ``forget``)."""

    snapshot_ids: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    threads: int = 2
    """Tasks reading, re-encrypting and storing chunks at once."""
    compression_level: int = 3
    frame_bytes: int = DEFAULT_DISK_FRAME_BYTES
    """Chunks read one after another (neighbours in the source's packs) are compressed
    together in frames of up to this many bytes, as a disk backup does (see docs/format.md)."""


@dataclass(slots=True)
class CopyResult:
    """What a copy did."""

    shared_ids: bool = False
    """True when the two repositories share the chunk-id key (chunks the target has are
    not read)."""
    copied: list[tuple[str, str]] = field(default_factory=list)
    """``(source id, target id)`` of each snapshot copied, oldest first."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(source id, target id)`` of snapshots the target already had a copy of."""
    chunks_read: int = 0
    bytes_read: int = 0
    """Chunks (and their plaintext bytes) read from the source."""
    chunks_added: int = 0
    bytes_added_stored: int = 0
    """Chunks the target lacked, and what they take there (what was uploaded, but packs'
    headers and index objects)."""
    damaged: list[tuple[str, str]] = field(default_factory=list)
    """``(id, problem)`` of source snapshot objects that could not be read (not copied)."""


def shares_chunk_ids(source: Repository, target: Repository) -> bool:
    """Whether both repositories give the same chunk the same id (without showing a key)."""
    return source.chunk_id(_PROBE) == target.chunk_id(_PROBE)


def copy_snapshots(
    source: Repository,
    target: Repository,
    options: CopyOptions | None = None,
    *,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> CopyResult:
    """Copy the selected snapshots of ``source`` that ``target`` has no copy of yet."""
    options = options or CopyOptions()
    cancel = cancel or Cancellation()
    progress = progress or NullProgress()
    result = CopyResult(shared_ids=shares_chunk_ids(source, target))
    with source.lock(exclusive=False), target.lock(exclusive=False):
        target.recover_unindexed_packs()  # what an interrupted copy uploaded is reused
        wanted = _select(source, options, result.damaged)
        originals = _originals(source)
        copies = {original: sid for sid, original in _originals(target).items()}
        state = ProgressState("copy", files_total=len(wanted))
        copier = _Copier(source, target, options, result, cancel, state)
        try:
            with Ticker(progress, state):
                for snap in wanted:
                    cancel.check()
                    state.current = snap.short_id
                    original = originals.get(snap.id, snap.id)
                    done = copies.get(original)
                    if done is not None:
                        result.skipped.append((snap.id, done))
                    else:
                        parent = copies.get(originals.get(snap.parent or "", snap.parent or ""))
                        copies[original] = copier.copy(snap, original, parent)
                        result.copied.append((snap.id, copies[original]))
                    state.files_done += 1
        except BaseException:
            cancel.cancel()  # Ctrl-C or a failure: running tasks stop at their next chunk
            raise
        finally:
            copier.close()
        progress.done(state)
    return result


def _select(
    source: Repository, options: CopyOptions, damaged: list[tuple[str, str]]
) -> list[Snapshot]:
    everything = load_snapshots(source, damaged=damaged)
    if options.snapshot_ids:
        ids = {source.resolve_snapshot_id(ref) for ref in options.snapshot_ids}
        everything = [s for s in everything if s.id in ids]
    return select_snapshots(everything, hosts=options.hosts, tags=options.tags, paths=options.paths)


def _originals(repo: Repository) -> dict[str, str]:
    """Snapshot id -> id of the snapshot it is a copy of (itself if none), for every
    readable snapshot of ``repo``."""
    return {sid: str(doc.get("original") or sid) for sid, doc in repo.list_snapshots(damaged=[])}


class _Copier:
    """Copies snapshots' chunks, trees and disk indexes; remembers ids across snapshots."""

    def __init__(
        self,
        source: Repository,
        target: Repository,
        options: CopyOptions,
        result: CopyResult,
        cancel: Cancellation,
        state: ProgressState,
    ) -> None:
        self.source, self.target, self.options = source, target, options
        self.result, self.cancel, self.state = result, cancel, state
        self.ids: dict[bytes, ChunkId] = {}
        """Source id -> target id of every data chunk known to be in the target."""
        self.trees: dict[bytes, ChunkId] = {}
        self.counting = threading.Lock()
        self.pool = ThreadPoolExecutor(max(1, options.threads), thread_name_prefix="copy")

    def copy(self, snap: Snapshot, original: str, parent: str | None) -> str:
        """Copy one snapshot; return its id in the target (``parent``: the target's id of
        the copy of its parent, if there is one)."""
        doc: dict[str, Any] = dict(self.source.load_snapshot(snap.id))
        if snap.tree is not None:
            doc["tree"] = self._tree(snap.tree).hex()
        if snap.disks:
            doc["disks"] = [self._disk(ref).to_json() for ref in snap.disks]
        doc["original"] = original
        doc["parent"] = parent
        return self.target.save_snapshot(doc)

    # --- data chunks ----------------------------------------------------------------------------

    def _resolve(self, wanted: list[ChunkId]) -> None:
        """Make sure every chunk of ``wanted`` is in the target and its target id known."""
        todo = [cid for cid in dict.fromkeys(wanted) if cid not in self.ids]
        if self.result.shared_ids:
            for cid in todo:
                if self.target.has_chunk(cid):
                    self.ids[cid] = cid
            todo = [cid for cid in todo if cid not in self.ids]
        batches = [todo[i : i + _BATCH_CHUNKS] for i in range(0, len(todo), _BATCH_CHUNKS)]
        for found in self.pool.map(self._transfer, batches):
            self.ids.update(found)

    def _transfer(self, batch: list[ChunkId]) -> dict[bytes, ChunkId]:
        """Read ``batch`` from the source, store what the target lacks; source -> target id."""
        found: dict[bytes, ChunkId] = {}
        frame: list[tuple[ChunkId, memoryview]] = []
        for cid, data in self.source.read_chunks(batch):
            self.cancel.check()
            if frame and sum(len(d) for _, d in frame) + len(data) > self.options.frame_bytes:
                self._store(frame)
            new = cid if self.result.shared_ids else self.target.chunk_id(data)
            frame.append((new, memoryview(data)))
            found[cid] = new
        self._store(frame)
        return found

    def _store(self, frame: list[tuple[ChunkId, memoryview]]) -> None:
        """Store the new ones of ``frame``'s chunks in the target, together; empty it."""
        if not frame:
            return
        level = self.options.compression_level
        added, stored = self.target.add_chunks(frame, BlobKind.DATA, level=level)
        read = sum(len(data) for _, data in frame)
        with self.counting:
            self.result.chunks_read += len(frame)
            self.result.bytes_read += read
            self.state.bytes_done += read
            self.result.chunks_added += added
            self.result.bytes_added_stored += stored
        frame.clear()

    # --- trees and disks ------------------------------------------------------------------------

    def _tree(self, root: ChunkId) -> ChunkId:
        """Copy the tree ``root`` and everything below it; return its id in the target."""
        listings = dict(self._walk(root))
        wanted = [
            cid
            for docs in listings.values()
            for node in docs
            if node.get("content")
            for cid, _n in content_runs(node)
            if cid is not None
        ]
        self._resolve(wanted)
        for tree_id in self._children_first(root, listings):
            self.cancel.check()
            docs = listings[tree_id]
            for node in docs:
                if node.get("content"):
                    node["content"] = [
                        [self.ids[cid].hex() if cid else None, n] for cid, n in content_runs(node)
                    ]
                if node.get("subtree"):
                    node["subtree"] = self.trees[bytes.fromhex(node["subtree"])].hex()
            self.trees[tree_id] = save_tree_docs(self.target, docs)
        return self.trees[root]

    def _walk(self, root: ChunkId) -> Iterator[tuple[ChunkId, list[dict[str, Any]]]]:
        """Every tree below ``root`` not yet copied in this run, parents before children."""
        stack, seen = [root], set()
        while stack:
            tree_id = stack.pop()
            if tree_id in self.trees or tree_id in seen:
                continue
            seen.add(tree_id)
            self.cancel.check()
            docs = load_tree_docs(self.source, tree_id)
            stack.extend(ChunkId(bytes.fromhex(n["subtree"])) for n in docs if n.get("subtree"))
            yield tree_id, docs

    def _children_first(
        self, root: ChunkId, listings: dict[ChunkId, list[dict[str, Any]]]
    ) -> list[ChunkId]:
        """The trees of ``listings`` in an order where every tree follows its subtrees."""
        order: list[ChunkId] = []
        done = set(self.trees)
        stack = [(root, False)]
        while stack:
            tree_id, expanded = stack.pop()
            if tree_id in done:
                continue
            if expanded:
                done.add(tree_id)
                order.append(tree_id)
                continue
            stack.append((tree_id, True))
            for node in listings[tree_id]:
                if node.get("subtree"):
                    stack.append((ChunkId(bytes.fromhex(node["subtree"])), False))
        return order

    def _disk(self, ref: DiskRef) -> DiskRef:
        """Copy a disk's chunks and index; return its reference in the target."""
        index = load_disk_index(self.source, ref)
        entries = list(index.entries())
        self._resolve([cid for _n, cid in entries])
        copied = DiskIndex(ref.name, ref.size_bytes, ref.chunk_bytes)
        for number, cid in entries:
            copied.put(number, self.ids[cid])
        return save_disk_index(self.target, copied, path=ref.path, bitmap=ref.bitmap)

    def close(self) -> None:
        """Stop the worker threads (tasks not started yet are dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
