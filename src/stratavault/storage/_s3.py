"""``S3Storage``: objects in a bucket of any S3-compatible store (AWS, Ceph RGW, MinIO, SeaweedFS).

Object ``name`` is the key ``<prefix>/<name>``. Large puts are multipart uploads whose
parts go up in parallel; large gets are range requests fetched in parallel. Errors are
mapped to the classes of ``stratavault.errors``: throttling, 5xx answers and broken
connections are :class:`TransientStorageError` (wrap in ``RetryingStorage``; botocore's
own retries are off so that a retried conditional put is judged by that wrapper, which
knows that a 412 after an ambiguous failure may be our own earlier attempt).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import botocore.exceptions

from stratavault.errors import (
    ObjectExistsError,
    ObjectLockedError,
    ObjectNotFoundError,
    PermissionDeniedError,
    StorageError,
    TransientStorageError,
)
from stratavault.storage._base import ObjectInfo, StorageProperties, check_name, put_file_content
from stratavault.storage._range import check_range
from stratavault.storage._s3_errors import BOTO_ERRORS, error_code, http_status, s3_error

__all__ = ["S3Storage"]

_T = TypeVar("_T")
MIB = 1 << 20
_MIN_PART_BYTES = 5 * MIB
"""S3's smallest part (all but the last)."""
_UNLOCKED_PREFIX = ("locks/", "index/", "gc/")
"""Never retained: locks are refreshed and removed by every client; index objects (rebuilt
from pack headers by ``repair index``) and prune's plan objects are replaced by prune."""


def _check_settings(bucket: str, part_size_bytes: int, lock_days: int | None) -> None:
    """StorageError for a bucket name, part size or retention S3 would refuse."""
    if len(bucket) < 3 or "/" in bucket:
        raise StorageError(f"S3 bucket name {bucket!r} is invalid (3 or more characters, no /)")
    if part_size_bytes < _MIN_PART_BYTES:
        raise StorageError(f"S3 part size {part_size_bytes} is below the minimum of 5 MiB")
    if lock_days is not None and lock_days < 1:
        raise StorageError(f"S3 object lock of {lock_days} days: give 1 or more days")


class S3Storage:
    """A bucket (and an optional key prefix) of an S3-compatible store as a ``Storage``.

    ``endpoint_url`` (``https://host:port``) selects a store other than AWS; ``region``
    defaults to the usual AWS configuration (``us-east-1`` if none). ``path_style``
    addressing (``host/bucket/key``) is the default with an endpoint, virtual hosts
    (``bucket.host/key``) without. Credentials are the explicit ones if given, else the
    usual places: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, the ``profile`` (or
    ``AWS_PROFILE``) of ``~/.aws``, instance roles.

    Objects larger than ``multipart_threshold_bytes`` are uploaded in parts of
    ``part_size_bytes``, and reads of more than ``part_size_bytes`` are split into
    ranges of that size; up to ``threads`` parts move at once per call. At most
    ``max_connections`` connections are kept open. ``put(overwrite=False)`` sends
    ``If-None-Match: *`` (conditional create) unless ``conditional_create`` is false,
    for stores that ignore it; then it checks first, which is not atomic.

    ``lock_days``: every new object except ``locks/*`` gets S3 Object Lock retention
    in COMPLIANCE mode for that many days (the bucket must have object lock enabled);
    ``delete`` then removes an object's versions, which the store refuses while one
    is retained (:class:`ObjectLockedError` with the date); retention dates count from
    ``clock()``. The bucket and the credentials are checked at the first call, not in
    the constructor.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        lock_days: int | None = None,
        conditional_create: bool = True,
        multipart_threshold_bytes: int = 64 * MIB,
        part_size_bytes: int = 16 * MIB,
        threads: int = 4,
        max_connections: int = 16,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 120.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        _check_settings(bucket, part_size_bytes, lock_days)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.lock_days = lock_days
        self.multipart_threshold_bytes = max(multipart_threshold_bytes, part_size_bytes)
        self.part_size_bytes = part_size_bytes
        self._clock = clock
        where = f"s3:{endpoint_url.rstrip('/')}/" if endpoint_url else "s3://"
        location = f"{where}{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._properties = StorageProperties(
            location, conditional_create, fork_safe=False, read_range_bytes=32 << 20
        )
        if path_style is None:
            path_style = endpoint_url is not None
        self._client: Any = _client(
            location,
            endpoint_url,
            dict(
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
                profile_name=profile,
                region_name=region,
            ),
            dict(
                s3={"addressing_style": "path" if path_style else "virtual"},
                retries={"total_max_attempts": 1},  # RetryingStorage retries, knowing what is safe
                max_pool_connections=max_connections,
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                tcp_keepalive=True,
            ),
        )
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="s3-part")
        self._bucket_checked = False
        self._check_lock = threading.Lock()

    @property
    def properties(self) -> StorageProperties:
        """Location ``s3:<endpoint>/<bucket>/<prefix>``; durable; conditional create if enabled."""
        return self._properties

    # --- the Storage contract -------------------------------------------------------------------

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data`` under ``name`` (see ``Storage.put``); multipart when large."""
        key = self._key(name)
        view = memoryview(data)
        body = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        extra: dict[str, Any] = self._retention(name)
        if not overwrite:
            if self.properties.conditional_create:
                extra["IfNoneMatch"] = "*"
            elif self._exists(key, name):
                raise ObjectExistsError(f"put {name} at {self.properties.location} - object exists")
        if body.nbytes > self.multipart_threshold_bytes:
            self._call("put", name, lambda: self._put_multipart(key, body, extra))
            return
        payload = data if isinstance(data, bytes) else body.tobytes()
        self._call(
            "put", name,
            lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=payload, **extra),
        )  # fmt: skip

    def put_file(self, name: str, path: str, *, overwrite: bool = False) -> None:
        """Upload the file's content under ``name`` (see ``Storage.put_file``)."""
        put_file_content(self, name, path, overwrite=overwrite)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return a range of ``name`` (see ``Storage.get``); large reads go in parallel parts."""
        key = self._key(name)
        check_range(name, offset, length)
        if length == 0:
            self.stat(name)
            return b""
        first = self.part_size_bytes if length is None else min(length, self.part_size_bytes)
        data, total, etag = self._get_range(key, name, offset, first, None)
        end = total if length is None else min(total, offset + length)
        start = offset + len(data)
        if start >= end:
            return data
        size = self.part_size_bytes
        ranges = [(s, min(size, end - s)) for s in range(start, end, size)]
        parts = self._pool.map(lambda r: self._get_range(key, name, r[0], r[1], etag)[0], ranges)
        return b"".join([data, *parts])

    def stat(self, name: str) -> ObjectInfo:
        """Name and size of ``name`` (a HEAD request)."""
        key = self._key(name)
        head = self._call(
            "stat", name, lambda: self._client.head_object(Bucket=self.bucket, Key=key)
        )
        return ObjectInfo(name, int(head["ContentLength"]))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose names start with ``prefix`` (ListObjectsV2, 1000 per page)."""
        base = f"{self.prefix}/" if self.prefix else ""
        self._check_bucket("list", prefix or "/")
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base + prefix
        )
        iterator = iter(pages)
        while True:
            page = self._call("list", prefix or "/", lambda: next(iterator, None))
            if page is None:
                return
            for item in page.get("Contents", ()):
                name = item["Key"][len(base) :]
                if name.startswith(prefix) and _valid(name):  # some stores normalise "a//"
                    yield ObjectInfo(name, int(item["Size"]))

    def delete(self, name: str) -> None:
        """Remove ``name``; with ``lock_days``, every version of it (refused while retained)."""
        key = self._key(name)
        if self.lock_days is None:
            self.stat(name)  # S3 deletes a missing key without complaint; the contract does not
            self._call(
                "delete", name, lambda: self._client.delete_object(Bucket=self.bucket, Key=key)
            )
            return
        self._delete_versions(key, name)

    def close(self) -> None:
        """Stop the part threads and close the connection pool."""
        self._pool.shutdown(wait=True)
        self._client.close()

    # --- object lock ----------------------------------------------------------------------------

    def retained_until(self, name: str) -> dt.datetime | None:
        """The object lock retention date of ``name`` (timezone-aware), None when it has none."""
        key = self._key(name)
        head = self._call(
            "stat", name, lambda: self._client.head_object(Bucket=self.bucket, Key=key)
        )
        until = head.get("ObjectLockRetainUntilDate")
        return until.astimezone(dt.UTC) if isinstance(until, dt.datetime) else None

    def extend_retention(self, name: str, until: dt.datetime) -> bool:
        """Keep ``name`` under COMPLIANCE retention until at least ``until``; False when it was
        retained longer already (the store refuses to shorten a retention)."""
        key = self._key(name)
        retention = {"Mode": "COMPLIANCE", "RetainUntilDate": until}
        try:
            self._call(
                "retain", name,
                lambda: self._client.put_object_retention(
                    Bucket=self.bucket, Key=key, Retention=retention
                ),
            )  # fmt: skip
        except PermissionDeniedError:
            current = self.retained_until(name)
            if current is None or current < until:
                raise
            return False
        return True

    def _retention(self, name: str) -> dict[str, Any]:
        if self.lock_days is None or name.startswith(_UNLOCKED_PREFIX):
            return {}
        until = self._clock() + dt.timedelta(days=self.lock_days)
        return {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}

    def _delete_versions(self, key: str, name: str) -> None:
        pages = self._client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=key
        )
        listing = self._call("delete", name, lambda: list(pages))
        versions = [v for p in listing for v in p.get("Versions", ()) if v["Key"] == key]
        markers = [m for p in listing for m in p.get("DeleteMarkers", ()) if m["Key"] == key]
        current = [v for v in versions if v.get("IsLatest")]
        if not current:
            raise ObjectNotFoundError(
                f"delete {name} at {self.properties.location} - no such object"
            )
        for version in current + [v for v in versions if not v.get("IsLatest")] + markers:
            try:
                self._delete_version(key, name, str(version["VersionId"]))
            except PermissionDeniedError as e:
                until = self._version_retention(key, version["VersionId"])
                if until is None:
                    raise
                if version is not current[0]:
                    continue  # an older version still retained: the object itself is gone
                raise ObjectLockedError(
                    f"delete {name} at {self.properties.location} - kept by object lock "
                    f"retention until {until.isoformat(timespec='seconds')}",
                    retain_until=until,
                ) from e

    def _delete_version(self, key: str, name: str, version_id: str) -> None:
        self._call(
            "delete", name,
            lambda: self._client.delete_object(Bucket=self.bucket, Key=key, VersionId=version_id),
        )  # fmt: skip

    def _version_retention(self, key: str, version_id: str) -> dt.datetime | None:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key, VersionId=version_id)
        except BOTO_ERRORS:
            return None
        until = head.get("ObjectLockRetainUntilDate")
        if isinstance(until, dt.datetime) and until > self._clock():
            return until.astimezone(dt.UTC)
        return None

    # --- transfers ------------------------------------------------------------------------------

    def _put_multipart(self, key: str, body: memoryview, extra: dict[str, Any]) -> None:
        """Upload ``body`` in parts, in parallel; abort the upload if anything fails."""
        create_extra = {k: v for k, v in extra.items() if k != "IfNoneMatch"}
        upload = self._client.create_multipart_upload(Bucket=self.bucket, Key=key, **create_extra)
        upload_id = upload["UploadId"]
        size = self.part_size_bytes
        starts = range(0, body.nbytes, size)

        def send(n: int) -> dict[str, Any]:
            part = body[starts[n] : starts[n] + size].tobytes()
            answer = self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=n + 1, Body=part
            )
            return {"PartNumber": n + 1, "ETag": answer["ETag"]}

        try:
            parts = list(self._pool.map(send, range(len(starts))))
            conditional = {k: v for k, v in extra.items() if k == "IfNoneMatch"}
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, **conditional,
            )  # fmt: skip
        except BaseException:
            # if even the abort fails, the store's lifecycle rules clean up the parts
            with contextlib.suppress(*BOTO_ERRORS):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def _get_range(
        self, key: str, name: str, offset: int, length: int, etag: str | None
    ) -> tuple[bytes, int, str]:
        """One ranged GET: (bytes, total object size, ETag); empty past the end."""
        extra = {"IfMatch": etag} if etag else {}

        def request() -> tuple[bytes, int, str]:
            try:
                answer = self._client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}",
                    **extra,
                )  # fmt: skip
            except botocore.exceptions.ClientError as e:
                if error_code(e) == "InvalidRange":  # at or past the end of an existing object
                    return b"", offset, ""
                raise
            data: bytes = answer["Body"].read()
            total = _total_size(answer.get("ContentRange"), offset + len(data))
            return data, total, str(answer.get("ETag", ""))

        data, total, tag = self._call("get", name, request)
        if etag and len(data) < min(length, total - offset):
            raise TransientStorageError(f"get {name} at {self.properties.location} - short read")
        return data, total, tag

    def _exists(self, key: str, name: str) -> bool:
        try:
            self._call("stat", name, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        except ObjectNotFoundError:
            return False
        return True

    # --- names and errors -----------------------------------------------------------------------

    def _key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _check_bucket(self, operation: str, name: str) -> None:
        """Once per storage: fail clearly on a missing bucket or rejected credentials.

        HEAD answers carry no error code, so a 404 or 403 on a HEAD of an object cannot
        tell a missing bucket or a wrong secret from a missing object or a refusal; and
        some stores create a missing bucket on PUT. A one-key listing answers with a code.
        """
        if self._bucket_checked:
            return
        with self._check_lock:
            if self._bucket_checked:
                return
            try:
                self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            except botocore.exceptions.ClientError as e:
                if http_status(e) == 404 or error_code(e) == "NoSuchBucket":
                    raise StorageError(self._no_bucket(operation, name)) from None
                if error_code(e) != "AccessDenied":  # may not list: the operation will tell
                    raise self._error(operation, name, e) from e
            except botocore.exceptions.BotoCoreError as e:
                raise self._error(operation, name, e) from e
            self._bucket_checked = True

    def _call(self, operation: str, name: str, fn: Callable[[], _T]) -> _T:
        """Run one request, translating botocore's errors into ours."""
        self._check_bucket(operation, name)
        try:
            return fn()
        except BOTO_ERRORS as e:
            raise self._error(operation, name, e) from e

    def _no_bucket(self, operation: str, name: str) -> str:
        return (
            f"{operation} {name} at {self.properties.location} - the bucket {self.bucket!r} "
            "does not exist (create it first, or check the bucket name and endpoint)"
        )

    def _error(self, operation: str, name: str, e: Exception) -> StorageError:
        return s3_error(
            e,
            where=f"{operation} {name} at {self.properties.location}",
            operation=operation,
            no_bucket=self._no_bucket(operation, name),
            locked_bucket=self.bucket if self.lock_days is not None else None,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.properties.location!r})"


def _client(
    location: str, endpoint: str | None, session: dict[str, Any], config: dict[str, Any]
) -> Any:
    """A boto3 S3 client; a missing profile or a bad endpoint is a clear error."""
    import boto3  # here, not at the top: it costs ~0.1 s, which local repositories need not pay
    import botocore.config

    try:
        made = boto3.session.Session(**session)
        region = session["region_name"] or made.region_name or "us-east-1"
        options = botocore.config.Config(region_name=region, **config)
        return made.client("s3", endpoint_url=endpoint, config=options)
    except (botocore.exceptions.BotoCoreError, ValueError) as e:
        raise StorageError(f"opening {location} - {e}") from e


def _total_size(content_range: str | None, fallback: int) -> int:
    """The object size from a ``Content-Range: bytes a-b/total`` answer."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return fallback


def _valid(name: str) -> bool:
    try:
        check_name(name)
    except StorageError:
        return False
    return True
