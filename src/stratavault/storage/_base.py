"""The ``Storage`` protocol: a flat store of named, immutable objects.

Object names are relative, ``/``-separated paths whose parts match
``[A-Za-z0-9][A-Za-z0-9._-]*`` (so no ``..``, no absolute names, no empty parts):
``config``, ``keys/<id>``, ``data/<xx>/<id>``, ``index/<id>``, ``snapshots/<id>``,
``locks/<id>``. Every backend and wrapper implements the same contract; the
conformance suite in ``tests/storage/`` checks it against each of them.

Calls may come from several threads at once; every implementation is thread-safe.
Every method that takes a name raises ``StorageError`` for an invalid one
(``check_name``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from stratavault.errors import StorageError

__all__ = ["ObjectInfo", "Storage", "StorageProperties", "check_name", "put_file_content"]

_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise :class:`StorageError`."""
    parts = name.split("/")
    if not name or not all(_NAME_PART.match(part) for part in parts):
        raise StorageError(f"invalid object name {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object: its name and size in bytes."""

    name: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class StorageProperties:
    """What a backend guarantees beyond the base contract.

    ``conditional_create``: ``put(..., overwrite=False)`` is atomic against a
    concurrent writer of the same name (exactly one wins). ``durable``: data
    survives a crash of this machine once ``put`` returned.
    ``location``: a human-readable place for messages ("/srv/repo", "s3://b/p").
    ``fork_safe``: the object may still be used in a child made by ``os.fork()``
    (a file system is; a pool of network connections, shared with the parent,
    is not). ``staging_dir``: a local folder where a file given to ``put_file`` is
    stored without being copied (the backend's own file system), or None.
    ``read_range_bytes``: how much one ranged ``get`` of neighbouring blobs should
    fetch at most. Where a request is cheap (a file), small ranges keep a restore's
    buffers small: a restore of bench/files.py's tree peaked at ~122 MiB with 32 MiB
    ranges and ~104 MiB with 2 MiB ones, no slower. Where each request is a round trip
    (S3), large ones keep the throughput up.
    """

    location: str
    conditional_create: bool = True
    durable: bool = True
    fork_safe: bool = True
    staging_dir: str | None = None
    read_range_bytes: int = 2 << 20


@runtime_checkable
class Storage(Protocol):
    """A backend: named immutable objects, read-after-write consistent."""

    @property
    def properties(self) -> StorageProperties:
        """What this backend guarantees, and where it is."""
        ...

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data`` under ``name``, atomically: readers see all of it or nothing.

        If ``name`` exists and ``overwrite`` is false, raise ``ObjectExistsError`` and
        leave the stored object unchanged. When ``put`` returns, ``get`` from any
        thread returns the new data. A failed ``put`` leaves no partial object
        (``StorageFullError`` when space ran out). Idempotent when retried with the
        same data and ``overwrite=True``.
        """
        ...

    def put_file(self, name: str, path: str, *, overwrite: bool = False) -> None:
        """Store the content of the local file ``path`` under ``name``, as ``put`` stores
        bytes (same atomicity, errors and idempotence). The file is left in place for the
        caller to remove, and must not be written to any more: a backend may make it the
        object (a file in ``properties.staging_dir`` is stored without a copy)."""
        ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes of object ``name`` from ``offset`` (to the end if None).

        The range is clipped at the object's end, so a short result means the object
        is shorter than asked for; callers that need exact sizes check. Raise
        ``ObjectNotFoundError`` when there is no such object, ``StorageError`` when
        ``offset`` or ``length`` is negative.
        """
        ...

    def stat(self, name: str) -> ObjectInfo:
        """Return name and size of ``name``; ``ObjectNotFoundError`` if missing."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose name starts with ``prefix``, in no given order.

        Objects put before the call starts are listed; objects put or deleted
        while the iteration runs may or may not be.
        """
        ...

    def delete(self, name: str) -> None:
        """Remove object ``name``; ``ObjectNotFoundError`` if it does not exist."""
        ...

    def close(self) -> None:
        """Release connections and handles; the storage is not used afterwards."""
        ...


def put_file_content(storage: Storage, name: str, path: str, *, overwrite: bool) -> None:
    """``storage.put_file`` for a backend that takes bytes: read the file and ``put`` it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise StorageError(f"put {name} from {path} - cannot read the file: {e}") from e
    storage.put(name, data, overwrite=overwrite)
