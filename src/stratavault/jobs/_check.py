"""Use case: check a repository's structure and, with ``read_data``, every chunk.

Structure: every snapshot's trees and disk indexes can be read, every chunk they reference
is in the index, and every pack the index names for them exists. With ``read_data`` each
referenced chunk is read, authenticated and decompressed. Each problem names the damaged
object and the snapshots and files (first few) that use it; a disk chunk is named by its
disk and byte range ("disk vda bytes 4194304-8388608"). (Index entries that no snapshot
uses and a read of every index entry come with prune, in a later step.) ``--read-data-subset``
spreads the reading over days.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice

from stratavault.errors import DataDamagedError
from stratavault.jobs._progress import Cancellation, NullProgress, Progress, ProgressState, now
from stratavault.repo import Repository
from stratavault.snapshot import (
    Node,
    NodeType,
    Snapshot,
    load_disk_index,
    load_snapshots,
    load_tree,
)
from stratavault.types import ChunkId

__all__ = ["CheckResult", "Damage", "Subset", "check_repository"]

_REFS_KEPT = 3
"""Users of a chunk remembered for the report (enough to find them, bounded memory)."""


@dataclass(slots=True)
class Damage:
    """A damaged or missing object and what it affects."""

    object: str
    problem: str
    snapshots: set[str] = field(default_factory=set)
    paths: list[str] = field(default_factory=list)


@dataclass(slots=True)
class CheckResult:
    """What was checked, and every problem found."""

    snapshots: int = 0
    trees: int = 0
    chunks: int = 0
    packs: int = 0
    chunks_read: int = 0
    damages: list[Damage] = field(default_factory=list)


class _Checker:
    def __init__(self, repo: Repository, progress: Progress, cancel: Cancellation) -> None:
        self.repo, self.progress, self.cancel = repo, progress, cancel
        self.result = CheckResult()
        self.refs: dict[ChunkId, list[tuple[str, str]]] = {}
        self.seen_trees: set[ChunkId] = set()
        self.pack_chunks: dict[str, list[ChunkId]] = {}
        """The chunks snapshots use, by pack (once :meth:`check_chunks` ran)."""
        self.pack_sizes: dict[str, int] = {}
        """The packs on the backend and their sizes (listed once, by :meth:`check_chunks`)."""
        self.state = ProgressState(phase="check", started=now())

    def users(self, ids: Iterable[ChunkId]) -> list[tuple[str, str]]:
        """The first snapshots and paths that use any of ``ids``."""
        return list(islice((u for cid in ids for u in self.refs[cid]), _REFS_KEPT))

    def refer(self, cid: ChunkId, snapshot: str, path: str) -> None:
        users = self.refs.setdefault(cid, [])
        if len(users) < _REFS_KEPT:
            users.append((snapshot, path))

    def damage(self, obj: str, problem: str, users: list[tuple[str, str]]) -> None:
        d = Damage(obj, problem, {s for s, _ in users}, [p for _, p in users])
        self.result.damages.append(d)
        self.progress.warn(f"{obj}: {problem}")

    def walk(self, snap: Snapshot, tree: ChunkId, prefix: str) -> None:
        self.cancel.check()
        if tree in self.seen_trees:
            return
        self.seen_trees.add(tree)
        self.result.trees += 1
        try:
            nodes = load_tree(self.repo, tree)
        except DataDamagedError as exc:
            self.damage(f"tree {tree.hex()}", str(exc), [(snap.id, prefix or "/")])
            return
        for node in nodes:
            self.visit(snap, node, f"{prefix}/{node.name}")

    def visit(self, snap: Snapshot, node: Node, path: str) -> None:
        if node.type == NodeType.DIR and node.subtree is not None:
            self.walk(snap, node.subtree, path)
        for cid, _n in node.content:
            if cid is not None:
                self.refer(cid, snap.id, path)

    def walk_disks(self, snap: Snapshot) -> None:
        """Read each disk index; its chunks' users are named as disk byte ranges."""
        for ref in snap.disks:
            self.cancel.check()
            self.result.trees += len(ref.segments)
            try:
                index = load_disk_index(self.repo, ref)
            except DataDamagedError as exc:
                self.damage(f"disk index of {ref.name}", str(exc), [(snap.id, f"disk {ref.name}")])
                continue
            for number, cid in index.entries():
                start, end = index.chunk_range(number)
                self.refer(cid, snap.id, f"disk {ref.name} bytes {start}-{end}")

    def check_index_packs(self) -> None:
        """Every pack the index names must exist, used by a snapshot or not (those used by one
        were reported with their snapshots already), and be large enough for what the index
        places in it (a truncated pack is found without reading it). Runs after
        :meth:`check_chunks`, whose listing of the packs it uses."""
        reported = {d.object for d in self.result.damages}
        for pack, least in sorted(self.repo.indexed_packs().items()):
            size = self.pack_sizes.get(pack)
            if f"pack {pack}" in reported or (size is not None and size >= least):
                continue
            if size is None:
                problem = "in the index but missing (run `repair index`)"
            else:
                problem = f"truncated: {size} bytes, the index places data up to byte {least}"
            self.damage(f"pack {pack}", problem, self.users(self.pack_chunks.get(pack, ())))

    def check_chunks(self, read_data: bool, subset: Subset | None) -> None:
        existing = self.pack_sizes = {o.name: o.size_bytes for o in self.repo.storage.list("data/")}
        missing: list[ChunkId] = []
        # also finds chunks of packs a prune is about to delete
        by_pack = self.pack_chunks = self.repo.chunks_by_pack(self.refs, missing=missing)
        for cid in missing:
            self.damage(f"chunk {cid.hex()}", "not in the index", self.refs[cid])
        self.result.chunks, self.result.packs = len(self.refs), len(by_pack)
        self.state.files_total = len(by_pack)
        for pack, ids in by_pack.items():
            self.cancel.check()
            if pack not in existing and not pack.startswith("("):
                self.damage(f"pack {pack}", f"missing ({len(ids)} chunks)", self.users(ids))
            elif read_data and (subset is None or subset.selects(pack)):
                self.read_pack(pack, ids)
                if pack in existing:
                    self.read_header(pack, existing[pack], ids)
            self.state.files_done += 1
            self.progress.update(self.state)

    def read_pack(self, pack: str, ids: list[ChunkId]) -> None:
        read = 0
        try:
            for _cid, data in self.repo.read_chunks(ids):
                read += 1
                self.state.bytes_done += len(data)
            self.result.chunks_read += read
            return
        except DataDamagedError:
            pass
        for cid in ids:  # find exactly which chunks are damaged
            try:
                self.repo.read_chunk(cid)
                self.result.chunks_read += 1
            except DataDamagedError as exc:
                self.damage(f"pack {pack}", f"chunk {cid.hex()[:16]}: {exc}", self.refs[cid])

    def read_header(self, pack: str, size: int, ids: list[ChunkId]) -> None:
        """The pack's own header (what `repair index` rebuilds the index from) must be
        intact and list the chunks the index places in the pack."""
        try:
            listed = self.repo.pack_header_ids(pack, size)
        except DataDamagedError as exc:
            keep = "its chunks are indexed, and `repair index` keeps their entries"
            self.damage(f"pack {pack}", f"header: {exc} ({keep})", self.users(ids))
            return
        absent = [cid for cid in ids if cid not in listed]
        if absent:
            problem = f"header does not list {len(absent)} chunks the index places here"
            self.damage(f"pack {pack}", f"{problem}, e.g. {absent[0].hex()[:16]}", self.users(ids))


@dataclass(frozen=True, slots=True)
class Subset:
    """Which packs ``--read-data-subset`` reads: part ``n`` of ``m`` (each pack in exactly one
    part, so running 1/m .. m/m over m days reads everything), or a random ``percent``."""

    n: int = 1
    m: int = 1
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> Subset:
        """``N/M`` or ``P%``; ``ValueError`` otherwise."""
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 < percent <= 100:
                raise ValueError(f"subset {text!r}: percent must be in (0, 100]")
            return cls(percent=percent)
        n_text, _, m_text = text.partition("/")
        n, m = int(n_text), int(m_text)
        if not 1 <= n <= m:
            raise ValueError(f"subset {text!r}: expected N/M with 1 <= N <= M")
        return cls(n, m)

    def selects(self, pack: str) -> bool:
        """Whether this subset reads ``pack`` (by the pack's content hash in its name)."""
        if self.percent is not None:
            return random.random() * 100 < self.percent
        return int(pack.rsplit("/", 1)[-1][:8], 16) % self.m == self.n - 1


def check_repository(
    repo: Repository,
    *,
    read_data: bool = False,
    subset: Subset | None = None,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> CheckResult:
    """Check every snapshot (and with ``read_data`` every chunk they use); never raises for
    damage found, it is listed in the result."""
    checker = _Checker(repo, progress or NullProgress(), cancel or Cancellation())
    with repo.lock(exclusive=False):
        damaged: list[tuple[str, str]] = []
        snapshots = load_snapshots(repo, damaged=damaged)
        repo.refresh_index()  # a backup that finished meanwhile indexed its packs first
        checker.result.snapshots = len(snapshots) + len(damaged)
        for sid, problem in damaged:
            fix = "restore the object from a copy, or remove it with `forget`"
            checker.damage(f"snapshot {sid}", f"{problem} ({fix})", [(sid, "/")])
        for name in repo.damaged_index_names():
            checker.damage(name, "index object damaged (run `repair index`)", [])
        for snap in snapshots:
            if snap.tree is not None:
                checker.walk(snap, snap.tree, "")
            checker.walk_disks(snap)
        checker.check_chunks(read_data or subset is not None, subset)
        checker.check_index_packs()
    checker.progress.done(checker.state)
    return checker.result
