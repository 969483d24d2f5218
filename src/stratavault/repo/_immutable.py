"""Immutable repositories: the ``immutable_days`` of the config applied to the backend.

A repository created with ``immutable_days`` N keeps every object but locks, index and
plan objects for N days after it is written: on S3, object lock retention in COMPLIANCE
mode (the bucket must have object lock enabled). A local folder cannot refuse a delete
to its owner, so creating an immutable repository there is refused; opening a local copy
of an immutable repository (seeding, or a download of the bucket) works without
retention.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from stratavault.errors import IntegrityError, UsageError
from stratavault.repo import _formats as F
from stratavault.storage import Storage

if TYPE_CHECKING:
    from stratavault.storage import S3Storage

__all__ = ["apply", "days", "extend"]

_THREADS = 8
"""Retention requests in flight at once (each is small)."""


def days(config: dict[str, Any], storage: Storage) -> int | None:
    """The retention in days the config asks for (None: none; older configs have none)."""
    value = config.get("immutable_days")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise IntegrityError(
            f"reading config of repository at {storage.properties.location} - "
            f"immutable_days {value!r} is not a number of days"
        )
    return value


def _s3(storage: Storage) -> S3Storage | None:
    """The S3 backend under the wrappers of ``storage``, if that is what it is (boto3 is
    loaded only here: only immutable repositories ask)."""
    from stratavault.storage import S3Storage

    current: Any = storage
    while not isinstance(current, S3Storage):
        current = getattr(current, "inner", None)
        if current is None:
            return None
    return current


def apply(storage: Storage, retention_days: int | None, *, creating: bool) -> None:
    """Write every later object of ``storage`` with ``retention_days`` of object lock.

    ``creating``: a backend that cannot lock objects is a UsageError (at ``init``);
    when opening, it is left as it is. A retention already asked for by the location
    (``?lock-days=``) is kept if longer.
    """
    if retention_days is None:
        return
    if retention_days < 1:
        raise UsageError(f"immutable for {retention_days} days: give 1 or more days")
    s3 = _s3(storage)
    if s3 is None:
        if creating:
            raise UsageError(
                f"creating an immutable repository at {storage.properties.location} - only "
                "an S3 bucket with object lock can refuse deletions; a local folder cannot "
                "(its owner can always delete; chattr +i needs root and would stop prune too)"
            )
        return
    s3.lock_days = max(s3.lock_days or 0, retention_days)


def extend(storage: Storage, config: dict[str, Any], packs: Iterable[str], now: float) -> int:
    """Retain ``packs``, every snapshot, every key slot and the config for the config's
    ``immutable_days`` from ``now`` (Unix seconds); return how many objects were extended.

    Retention counts from an object's write, so without this a pack that every new snapshot
    still uses would lose its protection N days after the first backup wrote it. Nothing to
    do for a repository that is not immutable or not on S3.
    """
    retention_days = days(config, storage)
    s3 = _s3(storage) if retention_days is not None else None
    if retention_days is None or s3 is None:
        return 0
    until = dt.datetime.fromtimestamp(now, dt.UTC) + dt.timedelta(days=retention_days)
    names = [*packs, F.CONFIG_NAME]
    for prefix in (F.SNAPSHOTS_PREFIX, F.KEYS_PREFIX):
        names.extend(o.name for o in storage.list(prefix))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="retain") as pool:
        return sum(pool.map(lambda name: s3.extend_retention(name, until), sorted(names)))
