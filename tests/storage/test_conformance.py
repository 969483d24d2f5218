"""Every backend and wrapper against the ``Storage`` contract (tests/storage is the suite)."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stratavault.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    PermissionDeniedError,
    StorageError,
)
from stratavault.storage import (
    AppendOnlyStorage,
    CachedStorage,
    FaultyStorage,
    LocalStorage,
    MemoryStorage,
    RateLimitedStorage,
    RetryingStorage,
    S3Storage,
    Storage,
)
from tests.s3server import S3Server

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    """How to build one storage under test, and where it departs from the plain contract."""

    make: Callable[[Path], Storage] | None = None
    append_only: bool = False
    # a retried delete of a missing object cannot tell "never there" from "removed by the
    # attempt that failed ambiguously"; RetryingStorage counts it as done
    exact_missing_delete: bool = True
    # backends on the S3 test server: made from (tmp, server, bucket, fresh prefix)
    make_s3: Callable[[Path, S3Server, str, str], Storage] | None = None


def _local(tmp: Path) -> Storage:
    return LocalStorage(tmp / "repo")


def _memory(tmp: Path) -> Storage:
    return MemoryStorage()


def _flaky(base: Callable[[Path], Storage]) -> Callable[[Path], Storage]:
    def make(tmp: Path) -> Storage:
        faulty = FaultyStorage(base(tmp), seed=7, error_rate=0.3)
        return RetryingStorage(faulty, attempts=12, sleep=lambda s: None)

    return make


def _s3(tmp: Path, server: S3Server, bucket: str, prefix: str) -> S3Storage:
    # small parts, so that test_large_object (20 MiB) is a multipart upload and a parallel read
    return S3Storage(
        bucket, prefix, **server.credentials(), part_size_bytes=5 * MIB,
        multipart_threshold_bytes=8 * MIB,
    )  # fmt: skip


CASES = {
    "local": Case(_local),
    "memory": Case(_memory),
    "faulty0-memory": Case(lambda t: FaultyStorage(_memory(t), seed=1)),
    "faulty0-local": Case(lambda t: FaultyStorage(_local(t), seed=1)),
    "retry-memory": Case(lambda t: RetryingStorage(_memory(t))),
    "retry-faulty-memory": Case(_flaky(_memory), exact_missing_delete=False),
    "retry-faulty-local": Case(_flaky(_local), exact_missing_delete=False),
    "ratelimited-memory": Case(
        lambda t: RateLimitedStorage(_memory(t), upload_bytes_per_s=GIB, download_bytes_per_s=GIB)
    ),
    "ratelimited-local": Case(
        lambda t: RateLimitedStorage(_local(t), upload_bytes_per_s=GIB, download_bytes_per_s=GIB)
    ),
    "appendonly-memory": Case(lambda t: AppendOnlyStorage(_memory(t)), append_only=True),
    "appendonly-local": Case(lambda t: AppendOnlyStorage(_local(t)), append_only=True),
    "cached-local": Case(lambda t: CachedStorage(_local(t), t / "cache")),
    "s3": Case(make_s3=_s3),
    "cached-s3": Case(make_s3=lambda t, s, b, p: CachedStorage(_s3(t, s, b, p), t / "cache")),
    "retry-faulty-s3": Case(
        make_s3=lambda t, s, b, p: RetryingStorage(
            FaultyStorage(_s3(t, s, b, p), seed=3, error_rate=0.2),
            attempts=12,
            sleep=lambda _: None,
        ),
        exact_missing_delete=False,
    ),
}
_prefixes = itertools.count()


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.infra("s3")] if c.make_s3 else [])
        for name, c in CASES.items()
    ]
)
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="session")
def conformance_bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@pytest.fixture
def store(case: Case, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Storage]:
    if case.make_s3 is not None:
        server: S3Server = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("conformance_bucket")
        prefix = f"t{next(_prefixes)}"
        storage = case.make_s3(tmp_path, server, bucket, prefix)
    else:
        assert case.make is not None
        storage = case.make(tmp_path)
    yield storage
    storage.close()


def test_is_a_storage(store: Storage) -> None:
    assert isinstance(store, Storage)
    assert store.properties.location


def test_put_get_stat(store: Storage) -> None:
    store.put("data/ab/abcdef", b"hello world")
    assert store.get("data/ab/abcdef") == b"hello world"
    info = store.stat("data/ab/abcdef")
    assert (info.name, info.size_bytes) == ("data/ab/abcdef", 11)


def test_empty_object(store: Storage) -> None:
    store.put("config", b"")
    assert store.get("config") == b""
    assert store.stat("config").size_bytes == 0
    assert [i.size_bytes for i in store.list()] == [0]


def test_range_get(store: Storage) -> None:
    store.put("obj", b"0123456789")
    assert store.get("obj", 2, 3) == b"234"
    assert store.get("obj", 7) == b"789"
    assert store.get("obj", 0, 0) == b""
    assert store.get("obj", 0, 10) == b"0123456789"


def test_range_get_is_clipped_at_the_end(store: Storage) -> None:
    store.put("obj", b"0123456789")
    assert store.get("obj", 8, 100) == b"89"
    assert store.get("obj", 10, 5) == b""
    assert store.get("obj", 50) == b""


def test_negative_range_is_refused(store: Storage) -> None:
    store.put("obj", b"0123456789")
    with pytest.raises(StorageError):
        store.get("obj", -1, 2)
    with pytest.raises(StorageError):
        store.get("obj", 0, -2)


def test_list_with_prefix(store: Storage) -> None:
    objects = {"config": 1, "data/aa/1": 2, "data/ab/2": 3, "index/3": 4, "data2": 5}
    for name, size in objects.items():
        store.put(name, b"x" * size)

    def names(prefix: str) -> dict[str, int]:
        return {i.name: i.size_bytes for i in store.list(prefix)}

    assert names("") == objects
    assert names("data/") == {"data/aa/1": 2, "data/ab/2": 3}
    assert names("data/a") == {"data/aa/1": 2, "data/ab/2": 3}
    assert names("data/aa") == {"data/aa/1": 2}
    assert names("data") == {"data/aa/1": 2, "data/ab/2": 3, "data2": 5}
    assert names("conf") == {"config": 1}
    assert names("nothing/") == {}
    assert names("data//") == {}


def test_list_of_an_empty_storage(store: Storage) -> None:
    assert list(store.list()) == []
    assert list(store.list("data/")) == []


def test_delete(case: Case, store: Storage) -> None:
    store.put("snapshots/1", b"a")
    store.put("locks/1", b"l")
    if case.append_only:
        with pytest.raises(PermissionDeniedError):
            store.delete("snapshots/1")
        assert store.get("snapshots/1") == b"a"
    else:
        store.delete("snapshots/1")
        with pytest.raises(ObjectNotFoundError):
            store.get("snapshots/1")
    store.delete("locks/1")  # allowed even when append-only
    with pytest.raises(ObjectNotFoundError):
        store.stat("locks/1")
    assert {i.name for i in store.list()} == ({"snapshots/1"} if case.append_only else set())


def test_missing_objects(case: Case, store: Storage) -> None:
    store.put("data/aa/present", b"x")
    for name in ("missing", "data/aa/missing", "data/zz/missing", "data"):
        with pytest.raises(ObjectNotFoundError):
            store.get(name)
        with pytest.raises(FileNotFoundError):  # ObjectNotFoundError is also one
            store.stat(name)
    with pytest.raises(ObjectNotFoundError):
        store.get("missing", 5, 10)
    if case.exact_missing_delete:
        with pytest.raises(ObjectNotFoundError):
            store.delete("locks/missing")
    else:
        with contextlib.suppress(ObjectNotFoundError):
            store.delete("locks/missing")
    assert [i.name for i in store.list()] == ["data/aa/present"]


def test_overwrite_is_refused_by_default(store: Storage) -> None:
    store.put("keys/k", b"first")
    with pytest.raises(ObjectExistsError):
        store.put("keys/k", b"second!")
    with pytest.raises(FileExistsError):
        store.put("keys/k", b"first")
    assert store.get("keys/k") == b"first"


def test_overwrite_when_allowed(case: Case, store: Storage) -> None:
    store.put("index/i", b"first")
    store.put("index/i", b"first", overwrite=True)  # same data: idempotent everywhere
    if case.append_only:
        with pytest.raises(PermissionDeniedError):
            store.put("index/i", b"second", overwrite=True)
        assert store.get("index/i") == b"first"
    else:
        store.put("index/i", b"second", overwrite=True)
        assert store.get("index/i") == b"second"
    store.put("index/new", b"new", overwrite=True)
    assert store.get("index/new") == b"new"
    assert sorted(i.name for i in store.list("index/")) == ["index/i", "index/new"]


BAD_NAMES = ["", "/abs", "a//b", "../x", "a/../b", ".hidden", "a/", "x y", "a/.tmp-1", "-a", "a\0b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused(store: Storage, name: str) -> None:
    with pytest.raises(StorageError, match="invalid object name"):
        store.put(name, b"x")
    with pytest.raises(StorageError, match="invalid object name"):
        store.get(name)
    with pytest.raises(StorageError, match="invalid object name"):
        store.stat(name)
    with pytest.raises(StorageError, match="invalid object name"):
        store.delete(name)
    assert list(store.list()) == []


def test_concurrent_create_has_one_winner(store: Storage) -> None:
    if not store.properties.conditional_create:
        pytest.skip("backend does not promise conditional create")
    barrier = threading.Barrier(8)
    won: list[bytes] = []
    lost: list[BaseException] = []

    def racer(i: int) -> None:
        data = bytes([i]) * (100 + i)  # distinct sizes: a retried put cannot claim another's
        barrier.wait()
        try:
            store.put("locks/exclusive", data)
            won.append(data)
        except ObjectExistsError as e:
            lost.append(e)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert store.get("locks/exclusive") == won[0]


def test_binary_data(store: Storage) -> None:
    data = bytes(range(256)) * 4 + b"\r\n\0\xff"
    store.put("data/00/bin", data)
    assert store.get("data/00/bin") == data
    assert store.get("data/00/bin", 255, 3) == b"\xff\x00\x01"


def test_large_object(store: Storage) -> None:
    data = random.Random(5).randbytes(20 << 20)
    store.put("data/ff/large", data)
    assert store.stat("data/ff/large").size_bytes == len(data)
    got = store.get("data/ff/large")
    assert got == data
    assert store.get("data/ff/large", (16 << 20) - 3, 1 << 20) == data[(16 << 20) - 3 :][: 1 << 20]


def test_memoryview_input(store: Storage) -> None:
    buf = bytearray(b"..payload..")
    store.put("a", memoryview(buf)[2:9])
    buf[2:9] = b"changed"  # the stored object is a copy, not a reference
    assert store.get("a") == b"payload"
    store.put("b", memoryview(os.urandom(64)).cast("I"))  # non-byte format: raw bytes count
    assert store.stat("b").size_bytes == 64
    store.put("c", memoryview(b"a-b-c-")[::2])  # not contiguous
    assert store.get("c") == b"abc"


def _staged(store: Storage, tmp_path: Path, data: bytes) -> Path:
    """A file to give ``put_file``: in the backend's staging folder when it has one."""
    folder = Path(store.properties.staging_dir or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".tmp-staged-{next(_prefixes)}"
    path.write_bytes(data)
    return path


def test_put_file(case: Case, store: Storage, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    staged = _staged(store, tmp_path, data)
    store.put_file("data/ab/abcdef", str(staged))
    assert store.get("data/ab/abcdef") == data
    assert staged.read_bytes() == data  # left in place for the caller
    with pytest.raises(ObjectExistsError):
        store.put_file("data/ab/abcdef", str(_staged(store, tmp_path, b"other")))
    assert store.get("data/ab/abcdef") == data
    if not case.append_only:
        store.put_file("data/ab/abcdef", str(_staged(store, tmp_path, b"new")), overwrite=True)
        assert store.get("data/ab/abcdef") == b"new"
    assert [i.name for i in store.list()] == ["data/ab/abcdef"]  # staged files not listed
    outside = tmp_path / "elsewhere"  # any local file will do
    outside.write_bytes(b"from elsewhere")
    store.put_file("snapshots/s1", str(outside))
    assert store.get("snapshots/s1") == b"from elsewhere"
    with pytest.raises(StorageError):
        store.put_file("snapshots/s2", str(tmp_path / "no such file"))
