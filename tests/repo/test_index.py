from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from stratavault.repo import KdfParams, Repository, _index
from stratavault.repo._index import ChunkIndex, Entry
from stratavault.storage import LocalStorage, MemoryStorage

from .conftest import PASS, open_repo, random_chunks

ROOT = Path(__file__).resolve().parents[2]


def test_million_entries_cost_under_100_bytes_each_and_stay_correct() -> None:
    count = 1_000_000
    ids = np.frombuffer(os.urandom(32 * count), dtype="S32")
    index = ChunkIndex()
    tracemalloc.start()
    for i in range(0, count, 7):  # some through the session dict and its merges
        index.add(ids[i].tobytes().ljust(32, b"\0"), Entry(i % 5, 0, i, i + 1, i + 2))
    from stratavault.repo._dtypes import INDEX_ENTRY

    bulk = np.zeros(count, dtype=INDEX_ENTRY)
    bulk["id"] = ids
    bulk["pack"] = np.arange(count) % 5
    bulk["offset"] = np.arange(count)
    bulk["stored"] = bulk["offset"] + 1
    bulk["raw"] = bulk["offset"] + 2
    keep = np.ones(count, dtype=bool)
    keep[::7] = False
    index.add_entries(bulk[keep])
    del bulk, keep
    index.merge_pending()
    current, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index) == count
    assert index.nbytes / count < 60
    assert current / count < 100, current / count
    for i in [0, 1, 7, 12345, 999_999, *range(500_000, 500_050)]:
        key = ids[i].tobytes().ljust(32, b"\0")
        assert index.lookup(key) == Entry(i % 5, 0, i, i + 1, i + 2)
    assert index.lookup(b"\0" * 32) is None
    assert index.lookup(os.urandom(32)) is None


def test_ids_with_trailing_zero_bytes() -> None:
    index = ChunkIndex()
    a, b = b"\1" * 31 + b"\0", b"\1" * 30 + b"\0\0"
    index.add(a, Entry(0, 0, 1, 1, 1))
    index.merge_pending()
    assert index.lookup(a) == Entry(0, 0, 1, 1, 1)
    assert index.lookup(b) is None
    assert index.missing([a, b]) == {b}


def test_missing_checks_many_ids_across_runs_and_fresh_entries() -> None:
    ids = [os.urandom(30) + b"\0\0" if i % 50 == 0 else os.urandom(32) for i in range(1000)]
    index = ChunkIndex()
    for start, stop in ((0, 600), (600, 800)):  # two sorted runs
        for i in range(start, stop):
            index.add(ids[i], Entry(0, 0, i, 1, 1))
        index.merge_pending()
    for i in range(800, 900):  # still in the session dict
        index.add(ids[i], Entry(0, 0, i, 1, 1))
    assert index.missing(ids) == set(ids[900:])
    assert index.missing(ids[:900]) == set()
    assert all((c in index) is (c not in index.missing([c])) for c in ids[::37])
    assert ChunkIndex().missing(ids[:3]) == set(ids[:3])
    assert index.missing([ids[0], b"short", ids[950]]) == {b"short", ids[950]}
    keys = np.frombuffer(b"".join(ids), dtype="S32")  # the ids with trailing zeros too
    assert index.present(keys).tolist() == [i < 900 for i in range(1000)]
    assert not ChunkIndex().present(keys[:3]).any()


def test_present_chunks_counts_chunks_on_their_way_into_a_pack(tmp_path: Path) -> None:
    repo = Repository.init(MemoryStorage(), PASS, cache_dir=tmp_path, kdf=KdfParams.fast())
    chunks = random_chunks(3)
    ids = [repo.chunk_id(c) for c in chunks]
    repo.add_chunk(ids[0], chunks[0])  # in an open pack: not indexed yet
    keys = np.frombuffer(b"".join(ids), dtype="S32")
    assert repo.present_chunks(keys).tolist() == [True, False, False]
    repo.flush()
    repo.add_chunk(ids[1], chunks[1])
    assert repo.present_chunks(keys).tolist() == [True, True, False]
    assert repo.present_chunks(keys).tolist() == [repo.has_chunk(c) for c in ids]
    repo.close()


def test_cache_written_extended_and_rebuilt(tmp_path: Path) -> None:
    storage = MemoryStorage()
    cache = tmp_path / "cache"
    repo = Repository.init(storage, PASS, cache_dir=cache, kdf=KdfParams.fast())
    first = random_chunks(5)
    ids = [repo.chunk_id(c) for c in first]
    for cid, c in zip(ids, first, strict=True):
        repo.add_chunk(cid, c)
    repo.close()
    assert [p.name for p in (cache / repo.id).iterdir()] == ["index.cache"]

    # another client (no cache) adds an index object
    other = open_repo(storage, None)
    more = random_chunks(3)
    more_ids = [other.chunk_id(c) for c in more]
    for cid, c in zip(more_ids, more, strict=True):
        other.add_chunk(cid, c)
    other.close()
    with open_repo(storage, cache) as again:
        assert all(again.has_chunk(i) for i in ids + more_ids)
        assert again.read_chunk(more_ids[0]) == more[0]
    loaded = ChunkIndex.load(cache / repo.id)
    assert loaded is not None and loaded[1] == {o.name for o in storage.list("index/")}

    # an index object disappears (compaction/prune elsewhere): rebuild, forget its chunks
    gone = next(o.name for o in storage.list("index/"))
    storage.delete(gone)
    with open_repo(storage, cache) as rebuilt:
        known = [rebuilt.has_chunk(i) for i in ids + more_ids]
    assert known.count(False) in (len(ids), len(more_ids))


def test_cache_is_written_only_when_the_index_changed(tmp_path: Path) -> None:
    """Every flush (a backup has several, and opening recovers unindexed packs) used to
    rewrite the whole cache file: 10 million chunks are ~480 MiB."""
    storage, cache = MemoryStorage(), tmp_path / "cache"
    Repository.init(storage, PASS, cache_dir=cache, kdf=KdfParams.fast()).close()
    with open_repo(storage, cache) as repo:
        data = b"x" * 5000
        repo.add_chunk(repo.chunk_id(data), data)
        repo.flush()
        path = cache / repo.id / "index.cache"
        written = path.stat().st_ino
        repo.flush()
        assert repo.recover_unindexed_packs() == 0
        assert path.stat().st_ino == written  # not replaced: nothing new
    with open_repo(storage, cache) as repo:
        repo.flush()
        assert path.stat().st_ino == written
        more = b"y" * 5000
        repo.add_chunk(repo.chunk_id(more), more)
        repo.flush()
        assert path.stat().st_ino != written
        assert ChunkIndex.load(cache / repo.id) is not None


def test_an_unusable_cache_is_replaced_even_by_an_empty_index(tmp_path: Path) -> None:
    storage, cache = MemoryStorage(), tmp_path / "cache"
    with Repository.init(storage, PASS, cache_dir=cache, kdf=KdfParams.fast()) as repo:
        data = b"z" * 5000
        repo.add_chunk(repo.chunk_id(data), data)
    for obj in list(storage.list("index/")):
        storage.delete(obj.name)  # the cache now covers index objects that are gone
    with open_repo(storage, cache) as again:
        loaded = ChunkIndex.load(cache / again.id)
        assert loaded is not None and loaded[1] == set()


def test_cache_is_used_without_reading_index_objects(tmp_path: Path) -> None:
    storage = MemoryStorage()
    cache = tmp_path / "cache"
    repo = Repository.init(storage, PASS, cache_dir=cache, kdf=KdfParams.fast())
    data = b"cached"
    cid = repo.chunk_id(data)
    repo.add_chunk(cid, data)
    repo.close()
    (name,) = [o.name for o in storage.list("index/")]
    # replace the index object content with garbage under the same name: only a reader notices
    storage.put(name, b"garbage", overwrite=True)
    with open_repo(storage, cache) as again:
        assert again.read_chunk(cid) == data


def test_periodic_index_objects(storage: MemoryStorage) -> None:
    Repository.init(storage, PASS, cache_dir=None, kdf=KdfParams.fast()).close()
    repo = open_repo(storage, None, index_every_packs=2)
    for c in random_chunks(60, 10_000):  # ~9 packs of 64 KiB
        repo.add_chunk(repo.chunk_id(c), c)
    deadline = time.monotonic() + 10
    while len(list(storage.list("index/"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(list(storage.list("index/"))) >= 3  # without flush
    repo.close()


def test_recover_unindexed_packs_after_sigkill(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "repo")
    Repository.init(storage, PASS, cache_dir=None, kdf=KdfParams.fast()).close()
    child = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from stratavault.repo import Repository
        from stratavault.storage import LocalStorage
        storage = LocalStorage(Path({str(tmp_path / "repo")!r}))
        repo = Repository.open(storage, {PASS!r}, cache_dir=None,
                               pack_target_bytes=65536, index_every_packs=10**6)
        out = open({str(tmp_path / "ids")!r}, "w")
        i = 0
        while len(list(storage.list("data/"))) < 4:
            data = i.to_bytes(8, "little") * 1250
            cid = repo.chunk_id(data)
            repo.add_chunk(cid, data, level=-5)
            out.write(f"{{i}} {{cid.hex()}}\\n"); out.flush()
            i += 1
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(storage.list("index/")) == []
    lines = (tmp_path / "ids").read_text().split()
    written = {bytes.fromhex(h): int(i) for i, h in zip(lines[::2], lines[1::2], strict=True)}
    with open_repo(storage, None) as repo:
        assert not any(repo.has_chunk(c) for c in written)  # type: ignore[arg-type]
        assert repo.recover_unindexed_packs() >= 4
        assert len(list(storage.list("index/"))) >= 1
        present = [c for c in written if repo.has_chunk(c)]  # type: ignore[arg-type]
        assert len(present) >= 4 * 4
        for cid in present:
            assert repo.read_chunk(cid) == written[cid].to_bytes(8, "little") * 1250  # type: ignore[arg-type]
        assert repo.recover_unindexed_packs() == 0
    with open_repo(storage, None) as again:
        assert all(again.has_chunk(c) for c in present)  # type: ignore[arg-type]


def test_recover_skips_damaged_packs(repo: Repository, storage: MemoryStorage) -> None:
    storage.put("data/ab/" + "ab" * 32, b"not a pack at all")
    storage.put("data/cd/" + "cd" * 32, b"")
    assert repo.recover_unindexed_packs() == 0


def test_index_objects_replaced_while_opening_are_listed_again(
    repo: Repository, storage: MemoryStorage
) -> None:
    """A prune beside us rewrites the index (new objects first, then the old deleted)
    between our listing of ``index/`` and our reading of it: we list again."""
    from stratavault.repo._collect import rewrite_index
    from stratavault.storage import StorageWrapper

    chunks = random_chunks(40, 20_000)
    ids = [repo.chunk_id(c) for c in chunks]
    for cid, data in zip(ids, chunks, strict=True):
        repo.add_chunk(cid, data)
    repo.flush()
    before = {o.name for o in storage.list("index/")}

    class PruneBeside(StorageWrapper):
        fired = False

        def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            if name.startswith("index/") and not self.fired:
                self.fired = True
                with open_repo(storage, None, index_every_packs=1) as other:
                    rewrite_index(other)  # other groupings: other names
                assert name not in {o.name for o in storage.list("index/")}
            return super().get(name, offset, length)

    racing = PruneBeside(storage)
    with open_repo(racing, None) as again:
        assert racing.fired and all(again.has_chunk(c) for c in ids)
    assert not before & {o.name for o in storage.list("index/")}


def test_a_prune_rewriting_the_index_again_and_again_does_not_stop_an_open(
    repo: Repository, storage: MemoryStorage
) -> None:
    """Prunes one after the other each rewrite the index while we read it, more times than
    we list ``index/`` again: what was read is kept, so every listing gets further."""
    from stratavault.repo._collect import rewrite_index
    from stratavault.storage import StorageWrapper

    chunks = random_chunks(40, 20_000)
    ids = [repo.chunk_id(c) for c in chunks]
    for cid, data in zip(ids, chunks, strict=True):
        repo.add_chunk(cid, data)
        repo.flush()  # an index object per chunk
    every = 1

    class PrunesBeside(StorageWrapper):
        rewrites = 0
        reads = 0

        def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            nonlocal every
            if name.startswith("index/"):
                self.reads += 1
                if self.rewrites < 8 and self.reads % 2 == 0:  # after one read each time
                    self.rewrites += 1
                    every = 3 - every  # other groupings: other names
                    with open_repo(storage, None, index_every_packs=every) as other:
                        rewrite_index(other)
            return super().get(name, offset, length)

    racing = PrunesBeside(storage)
    with open_repo(racing, None) as again:
        assert racing.rewrites == 8 and all(again.has_chunk(c) for c in ids)


def _index_of(seed: int, count: int, *, packs_reversed: bool = False) -> ChunkIndex:
    index = ChunkIndex()
    for number in reversed(range(3)) if packs_reversed else ():
        index.pack_number(f"data/p{seed}-{number}")
    for i in range(count):
        cid = bytes([seed]) * 16 + i.to_bytes(16, "big")
        index.add(cid, Entry(index.pack_number(f"data/p{seed}-{i % 3}"), 0, i, 10, 20))
    return index


def test_the_cache_pairs_entries_with_the_index_objects_they_cover(tmp_path: Path) -> None:
    """Backups and prune save the cache at the same time: whatever a reader finds, the
    entries and the covered index objects come from one save (they were two files, and a
    reader could pair one save's entries with another's objects: chunks went missing)."""
    a, b = _index_of(1, 50), _index_of(2, 80)
    a.save(tmp_path, ["index/a"])
    b.save(tmp_path, ["index/b1", "index/b2"])
    loaded = ChunkIndex.load(tmp_path)
    assert loaded is not None
    index, covered = loaded
    assert covered == {"index/b1", "index/b2"} and len(index) == 80
    cid = bytes([2]) * 16 + (79).to_bytes(16, "big")
    found = index.lookup(cid)
    assert found is not None and index.packs[found.pack] == "data/p2-1" and found.offset == 79
    assert [p.name for p in tmp_path.iterdir()] == ["index.cache"]


def test_a_cache_replaced_while_it_is_loaded_gives_one_saves_packs_and_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process replaces the cache after the loader read its head: the entries
    must still be those of the head read (the file was opened twice: prune then paired one
    save's list of packs with another's entries and read chunks from the wrong packs)."""
    ours, theirs = _index_of(1, 50), _index_of(1, 50, packs_reversed=True)
    ours.save(tmp_path, ["index/a"])

    class ReplacedAfterTheHead:
        dumps = staticmethod(json.dumps)

        @staticmethod
        def loads(text: bytes) -> object:
            theirs.save(tmp_path, ["index/b"])
            return json.loads(text)

    monkeypatch.setattr(_index, "json", ReplacedAfterTheHead)
    loaded = ChunkIndex.load(tmp_path)
    assert loaded is not None
    index, covered = loaded
    assert covered == {"index/a"}
    for i in range(50):
        found = index.lookup(bytes([1]) * 16 + i.to_bytes(16, "big"))
        assert found is not None and index.packs[found.pack] == f"data/p1-{i % 3}", i


def test_a_damaged_cache_is_ignored_and_the_index_read_from_the_repository(
    tmp_path: Path,
) -> None:
    storage, cache = MemoryStorage(), tmp_path / "cache"
    with Repository.init(storage, PASS, cache_dir=cache, kdf=KdfParams.fast()) as repo:
        chunks = random_chunks(5)
        ids = [repo.chunk_id(c) for c in chunks]
        for cid, data in zip(ids, chunks, strict=True):
            repo.add_chunk(cid, data)
    path = cache / repo.id / "index.cache"
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) - 10], b"SVIC" + b"\xff" * 20, b""):
        path.write_bytes(damaged)
        assert ChunkIndex.load(cache / repo.id) is None
        with open_repo(storage, cache) as again:
            assert [again.read_chunk(i) for i in ids] == chunks


def test_lookup_many_agrees_with_lookup_across_runs_and_pending() -> None:
    rng = np.random.default_rng(7)
    index = ChunkIndex()
    known: list[bytes] = []
    for run in range(5):  # several sorted runs of different sizes, some ids shadowed
        size = int(rng.integers(1, 3000))
        for i in range(size):
            cid = os.urandom(32) if not known or i % 11 else known[int(rng.integers(len(known)))]
            index.add(cid, Entry(run, 0, i, i + 1, i + 2))
            known.append(cid)
        index.merge_pending()
    index.add(known[3], Entry(99, 1, 2, 3, 4))  # a fresh entry shadows the runs
    index.add(b"\5" * 31 + b"\0", Entry(98, 0, 0, 0, 0))  # a trailing zero byte
    queries = [*known, b"\5" * 31 + b"\0", os.urandom(32), b"short", b"\0" * 32]
    queries = [queries[i] for i in rng.permutation(len(queries))]
    assert index.lookup_many(queries) == [index.lookup(q) for q in queries]
    assert index.lookup_many([]) == []
    assert ChunkIndex().lookup_many([b"\1" * 32]) == [None]
