"""S3Storage against a real SeaweedFS (tests/s3server.py), beyond the conformance suite."""

from __future__ import annotations

import datetime as dt
import http.server
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stratavault.errors import (
    ObjectExistsError,
    ObjectLockedError,
    ObjectNotFoundError,
    PermissionDeniedError,
    StorageError,
    TransientStorageError,
    UsageError,
)
from stratavault.storage import (
    CachedStorage,
    ObjectInfo,
    RetryingStorage,
    S3Storage,
    StorageWrapper,
    open_storage,
)
from tests.s3server import S3Server

MIB = 1 << 20
pytestmark = pytest.mark.infra("s3")


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


_prefixes = iter(range(1_000_000))


@pytest.fixture
def prefix() -> str:
    return f"s3test{next(_prefixes)}"


def _store(
    server: S3Server, bucket: str, prefix: str, identity: str = "admin", **kw: object
) -> S3Storage:
    return S3Storage(bucket, prefix, **server.credentials(identity), **kw)  # type: ignore[arg-type]


# --- transfers ------------------------------------------------------------------------------------


def test_multipart_upload_and_parallel_ranged_read(
    s3_server: S3Server, bucket: str, prefix: str
) -> None:
    data = random.Random(1).randbytes(20 * MIB)
    store = _store(
        s3_server, bucket, prefix, part_size_bytes=5 * MIB, multipart_threshold_bytes=8 * MIB
    )
    store.put("data/aa/big", data)
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{prefix}/data/aa/big")
    assert head["ETag"].strip('"').endswith("-4")  # a multipart object of 4 parts
    assert store.get("data/aa/big") == data
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads") in (None, [])
    store.close()


def test_small_object_is_one_put(s3_server: S3Server, bucket: str, prefix: str) -> None:
    store = _store(s3_server, bucket, prefix)
    store.put("data/aa/small", b"x" * 1000)
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{prefix}/data/aa/small")
    assert "-" not in head["ETag"]


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, None), (1, None), (5 * MIB - 1, 2), (5 * MIB, 5 * MIB), (3, 12 * MIB), (13 * MIB, None),
     (14 * MIB - 5, 100), (14 * MIB, 1), (20 * MIB, None), (0, 0), (7, 1)],
)  # fmt: skip
def test_range_reads(s3_server: S3Server, bucket: str, offset: int, length: int | None) -> None:
    data = random.Random(2).randbytes(14 * MIB)
    store = _store(s3_server, bucket, "ranges", part_size_bytes=5 * MIB)
    if not any(i.name == "data/r" for i in store.list("data/")):
        store.put("data/r", data, overwrite=True)
    end = None if length is None else offset + length
    assert store.get("data/r", offset, length) == data[offset:end]


def test_multipart_create_of_an_existing_name_is_refused(
    s3_server: S3Server, bucket: str, prefix: str
) -> None:
    store = _store(
        s3_server, bucket, prefix, part_size_bytes=5 * MIB, multipart_threshold_bytes=5 * MIB
    )
    first = random.Random(3).randbytes(11 * MIB)
    store.put("data/bb/pack", first)
    with pytest.raises(ObjectExistsError, match="object exists"):
        store.put("data/bb/pack", bytes(11 * MIB))
    assert store.get("data/bb/pack") == first
    uploads = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads") or []
    assert [u for u in uploads if u["Key"].startswith(prefix)] == []  # the failed one was aborted


def test_if_none_match_is_sent(s3_server: S3Server, bucket: str, prefix: str) -> None:
    store = _store(s3_server, bucket, prefix)
    assert store.properties.conditional_create
    store.put("keys/k", b"one")
    with pytest.raises(ObjectExistsError):
        store.put("keys/k", b"two")
    # a store that ignores If-None-Match: check first (not atomic, and the property says so)
    plain = _store(s3_server, bucket, prefix, conditional_create=False)
    assert not plain.properties.conditional_create
    with pytest.raises(ObjectExistsError):
        plain.put("keys/k", b"two")
    plain.put("keys/other", b"three")
    assert store.get("keys/k") == b"one" and store.get("keys/other") == b"three"


# --- errors ---------------------------------------------------------------------------------------


def test_wrong_secret_key(s3_server: S3Server, bucket: str) -> None:
    store = S3Storage(
        bucket, endpoint_url=s3_server.endpoint, access_key_id="admin", secret_access_key="nope"
    )
    with pytest.raises(PermissionDeniedError, match="secret key does not match the access key"):
        list(store.list())
    with pytest.raises(PermissionDeniedError, match="credentials rejected"):
        store.put("config", b"x")


def test_unknown_access_key(s3_server: S3Server, bucket: str) -> None:
    store = S3Storage(
        bucket, endpoint_url=s3_server.endpoint, access_key_id="who", secret_access_key="x"
    )
    with pytest.raises(PermissionDeniedError, match="access key id is unknown"):
        store.stat("config")


def test_missing_bucket(s3_server: S3Server) -> None:
    store = _store(s3_server, "no-such-bucket", "repo")
    for call in (
        lambda: store.stat("config"),
        lambda: store.get("config"),
        lambda: list(store.list()),
        lambda: store.put("config", b"x"),
    ):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as e:
            call()
        assert not isinstance(e.value, ObjectNotFoundError | TransientStorageError)
    assert "no-such-bucket" not in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}


def test_reader_may_read_but_not_write(s3_server: S3Server, bucket: str, prefix: str) -> None:
    _store(s3_server, bucket, prefix).put("snapshots/s", b"snap")
    reader = _store(s3_server, bucket, prefix, "reader")
    assert reader.get("snapshots/s") == b"snap"
    assert [i.name for i in reader.list()] == ["snapshots/s"]
    with pytest.raises(PermissionDeniedError, match="access denied: these credentials may not put"):
        reader.put("snapshots/t", b"x")
    with pytest.raises(PermissionDeniedError, match="may not delete"):
        reader.delete("snapshots/s")
    assert reader.get("snapshots/s") == b"snap"


def test_appender_may_add_but_not_delete(s3_server: S3Server) -> None:
    name = s3_server.new_bucket(append_only="repo")
    appender = _store(s3_server, name, "repo", "appender")
    appender.put("data/aa/p", b"pack")
    appender.put("snapshots/s", b"snap")
    for victim in ("data/aa/p", "snapshots/s"):
        with pytest.raises(PermissionDeniedError, match=f"delete {victim} .* access denied"):
            appender.delete(victim)
    with pytest.raises(ObjectExistsError):  # put(overwrite=False) never replaces
        appender.put("snapshots/s", b"evil")
    appender.put("locks/l", b"lock")  # its own lock: refresh and remove
    appender.put("locks/l", b"lock2", overwrite=True)
    appender.delete("locks/l")
    assert sorted(i.name for i in appender.list()) == ["data/aa/p", "snapshots/s"]
    admin = _store(s3_server, name, "repo")
    admin.delete("snapshots/s")  # prune runs elsewhere, with other credentials


def test_appender_overwrite_keeps_the_old_version(s3_server: S3Server) -> None:
    """SeaweedFS cannot refuse an overwrite by policy; a versioned bucket keeps what it replaced."""
    name = s3_server.new_bucket(append_only="", versioned=True)
    appender = _store(s3_server, name, "", "appender")
    appender.put("snapshots/s", b"good")
    appender.put("snapshots/s", b"evil", overwrite=True)  # raw S3 PUT: allowed by "Write"
    versions = s3_server.client().list_object_versions(Bucket=name, Prefix="snapshots/s")
    admin = s3_server.client()
    bodies = {
        admin.get_object(Bucket=name, Key="snapshots/s", VersionId=v["VersionId"])["Body"].read()
        for v in versions["Versions"]
    }
    assert bodies == {b"good", b"evil"}


class _RefusingServer(http.server.ThreadingHTTPServer):
    requests = 0


def _refusing_server(status: int, code: str) -> _RefusingServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            assert isinstance(self.server, _RefusingServer)
            self.server.requests += 1
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            body = f"<Error><Code>{code}</Code><Message>busy</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    return _RefusingServer(("127.0.0.1", 0), Handler)


@pytest.fixture
def busy_endpoint(request: pytest.FixtureRequest) -> Iterator[tuple[str, _RefusingServer]]:
    status, code = request.param
    server = _refusing_server(status, code)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize(
    "busy_endpoint", [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests")],
    indirect=True,
)  # fmt: skip
def test_throttling_and_5xx_are_transient_and_retried(
    busy_endpoint: tuple[str, _RefusingServer],
) -> None:
    """A minimal HTTP server that answers like a busy S3 (the bucket check passes on 200s only)."""
    endpoint, server = busy_endpoint
    store = S3Storage("bkt", endpoint_url=endpoint, access_key_id="a", secret_access_key="b")
    with pytest.raises(TransientStorageError, match="busy or failing"):
        store.get("config")
    retrying = RetryingStorage(store, attempts=3, sleep=lambda _: None)
    before = server.requests
    with pytest.raises(TransientStorageError):
        retrying.put("config", b"x")
    assert server.requests - before == 3
    store.close()


def test_connection_refused_is_transient() -> None:
    store = S3Storage(
        "bkt", endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b"
    )
    with pytest.raises(TransientStorageError, match="cannot connect"):
        store.stat("config")


# --- object lock ----------------------------------------------------------------------------------


def test_object_lock_retention_refuses_deletion(s3_server: S3Server) -> None:
    name = s3_server.new_bucket(object_lock=True)
    now = dt.datetime.now(dt.UTC)
    store = _store(s3_server, name, "repo", lock_days=3, clock=lambda: now)
    store.put("data/aa/pack", b"pack")
    store.put("locks/l", b"lock")
    store.put("locks/l", b"lock, refreshed", overwrite=True)
    until = store.retained_until("data/aa/pack")
    assert until is not None and abs(until - (now + dt.timedelta(days=3))) < dt.timedelta(seconds=2)
    with pytest.raises(ObjectLockedError, match="retention until") as e:
        store.delete("data/aa/pack")
    assert e.value.retain_until == until
    assert store.get("data/aa/pack") == b"pack"  # not even hidden behind a delete marker
    big = random.Random(4).randbytes(6 * MIB)  # a multipart upload gets the retention too
    locking_parts = _store(
        s3_server, name, "repo", lock_days=3, part_size_bytes=5 * MIB,
        multipart_threshold_bytes=5 * MIB,
    )  # fmt: skip
    locking_parts.put("data/bb/big", big)
    assert locking_parts.retained_until("data/bb/big") is not None
    with pytest.raises(ObjectLockedError):
        locking_parts.delete("data/bb/big")
    assert store.retained_until("locks/l") is None
    store.delete("locks/l")  # locks carry no retention: every version goes
    versions = s3_server.client().list_object_versions(Bucket=name, Prefix="repo/locks/")
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []
    with pytest.raises(ObjectNotFoundError):
        store.delete("locks/l")


def test_object_lock_needs_a_lock_enabled_bucket(
    s3_server: S3Server, bucket: str, prefix: str
) -> None:
    store = _store(s3_server, bucket, prefix, lock_days=1)
    with pytest.raises(StorageError, match="is object lock enabled on bucket"):
        store.put("data/aa/pack", b"pack")


# --- open_storage and the cache -------------------------------------------------------------------


def test_open_storage_forms(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "admin")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "admin-secret")
    url = f"s3:{s3_server.endpoint}/{bucket}/open/form"
    store = open_storage(url, cache_dir=tmp_path)
    assert isinstance(store, CachedStorage) and isinstance(store.inner, RetryingStorage)
    assert store.properties.location == url
    store.put("config", b"c")
    monkeypatch.setenv("STRATAVAULT_S3_ENDPOINT", s3_server.endpoint)
    other = open_storage(f"s3://{bucket}/open/form/?region=eu-west-1", cache_dir=None)
    assert isinstance(other, RetryingStorage)
    assert other.get("config") == b"c"
    with pytest.raises(UsageError, match="unknown option"):
        open_storage(f"s3://{bucket}/x?colour=blue")
    with pytest.raises(UsageError, match="lock-days must be a number"):
        open_storage(f"s3://{bucket}/x?lock-days=many")


class _Counting(StorageWrapper):
    def __init__(self, inner: S3Storage) -> None:
        super().__init__(inner)
        self.gets: list[str] = []

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.gets.append(name)
        return self.inner.get(name, offset, length)


def test_cache_saves_downloads_and_sees_deletions_by_others(
    s3_server: S3Server, bucket: str, prefix: str, tmp_path: Path
) -> None:
    other = _store(s3_server, bucket, prefix)  # another client of the same repository
    for name in ("config", "keys/k1", "index/i1", "snapshots/s1", "snapshots/s2", "data/aa/p"):
        other.put(name, name.encode())
    counting = _Counting(_store(s3_server, bucket, prefix))
    cached = CachedStorage(counting, tmp_path / "cache")
    for _ in range(3):
        names = sorted(i.name for i in cached.list())
        assert [cached.get(n) for n in names] == [n.encode() for n in names]
    assert sorted(counting.gets) == sorted([*names, "data/aa/p", "data/aa/p"])  # packs: each time
    assert cached.cached_names() == (
        "config",
        "index/i1",
        "keys/k1",
        "snapshots/s1",
        "snapshots/s2",
    )
    assert cached.get("snapshots/s1", 2, 4) == b"apsh"
    other.delete("snapshots/s1")
    assert [i.name for i in cached.list("snapshots/")] == ["snapshots/s2"]
    assert "snapshots/s1" not in cached.cached_names()
    with pytest.raises(ObjectNotFoundError):
        cached.get("snapshots/s1")
    cached.put("snapshots/s3", b"new")  # what we write is kept without a download
    assert cached.get("snapshots/s3") == b"new" and "snapshots/s3" not in counting.gets
    cached.delete("snapshots/s3")
    assert "snapshots/s3" not in cached.cached_names()


def test_list_returns_object_info(s3_server: S3Server, bucket: str, prefix: str) -> None:
    store = _store(s3_server, bucket, prefix)
    store.put("index/a", b"12345")
    assert list(store.list("index/")) == [ObjectInfo("index/a", 5)]
    assert repr(store) == f"S3Storage('s3:{s3_server.endpoint}/{bucket}/{prefix}')"


def test_a_whole_bucket_without_prefix(s3_server: S3Server) -> None:
    store = _store(s3_server, s3_server.new_bucket(), "")
    assert store.properties.location.endswith(store.bucket)
    store.put("config", b"c")
    store.put("data/aa/x", b"xx")
    assert {i.name: i.size_bytes for i in store.list()} == {"config": 1, "data/aa/x": 2}
    assert [i.name for i in store.list("data/")] == ["data/aa/x"]
    store.delete("config")
    with pytest.raises(ObjectNotFoundError):
        store.get("config")


def test_listing_goes_past_one_page(s3_server: S3Server, bucket: str, prefix: str) -> None:
    store = _store(s3_server, bucket, prefix)
    names = [f"index/{i:04d}" for i in range(1010)]  # ListObjectsV2 answers 1000 at most
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: store.put(n, b"i"), names))
    assert sorted(i.name for i in store.list("index/")) == names


def test_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(StorageError, match=r"opening s3://bkt/p - .*no-such-profile"):
        S3Storage("bkt", "p", profile="no-such-profile")
