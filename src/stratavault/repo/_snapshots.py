"""Snapshot objects: encrypted, compressed JSON documents named by their content hash."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from stratavault.errors import (
    DataDamagedError,
    IntegrityError,
    ObjectNotFoundError,
    SnapshotNotFoundError,
    UsageError,
)
from stratavault.repo import _formats as F
from stratavault.repo._crypto import MasterKeys, compress, content_hash
from stratavault.repo._reading import open_document
from stratavault.storage import Storage

__all__ = ["list_all", "load", "remove", "resolve", "save"]

_HEX = re.compile(r"[0-9a-f]{1,64}\Z")


def save(storage: Storage, keys: MasterKeys, document: dict[str, Any]) -> str:
    """Store ``document``; return its id."""
    plain = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    stored = keys.seal(compress(plain, 3), F.AD_SNAPSHOT)
    snapshot_id = content_hash(stored)
    storage.put(F.SNAPSHOTS_PREFIX + snapshot_id, stored)
    return snapshot_id


def _check_id(snapshot_id: str, *, prefix: bool = False) -> None:
    if not (_HEX.match(snapshot_id) or (prefix and not snapshot_id)):
        raise UsageError(f"snapshot id {snapshot_id!r} is not hexadecimal")


def load(storage: Storage, keys: MasterKeys, snapshot_id: str) -> dict[str, Any]:
    """The document of one snapshot."""
    _check_id(snapshot_id)
    name = F.SNAPSHOTS_PREFIX + snapshot_id
    try:
        plain = open_document(storage, keys, name, F.AD_SNAPSHOT)
    except ObjectNotFoundError as exc:
        raise SnapshotNotFoundError(f"loading snapshot {snapshot_id} - no such snapshot") from exc
    document: dict[str, Any] = json.loads(plain)
    return document


def ids(storage: Storage) -> list[str]:
    """Every snapshot id."""
    return [o.name.removeprefix(F.SNAPSHOTS_PREFIX) for o in storage.list(F.SNAPSHOTS_PREFIX)]


def list_all(
    storage: Storage, keys: MasterKeys, damaged: list[tuple[str, str]] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every snapshot with its document. A damaged one raises, or with ``damaged`` given is
    skipped and appended there as ``(id, message)``."""
    for snapshot_id in ids(storage):
        try:
            yield snapshot_id, load(storage, keys, snapshot_id)
        except SnapshotNotFoundError:
            continue  # removed while listing
        except (DataDamagedError, ValueError) as exc:
            if damaged is None:
                raise _damaged(snapshot_id, exc) from exc
            damaged.append((snapshot_id, str(_damaged(snapshot_id, exc))))


def _damaged(snapshot_id: str, exc: Exception) -> DataDamagedError:
    if isinstance(exc, DataDamagedError):
        return exc
    return IntegrityError(f"reading snapshot {snapshot_id} - malformed: {exc}")


def resolve(storage: Storage, prefix: str) -> str:
    """Unique prefix -> full id."""
    prefix = prefix.lower()
    _check_id(prefix, prefix=True)
    matches = [i for i in ids(storage) if i.startswith(prefix)]
    if not matches:
        raise SnapshotNotFoundError(f"finding snapshot {prefix} - no snapshot id starts with it")
    if len(matches) > 1:
        raise UsageError(
            f"finding snapshot {prefix} - ambiguous, {len(matches)} snapshots match: "
            + ", ".join(sorted(m[:12] for m in matches))
        )
    return matches[0]


def remove(storage: Storage, snapshot_id: str) -> None:
    """Delete one snapshot object."""
    _check_id(snapshot_id)
    try:
        storage.delete(F.SNAPSHOTS_PREFIX + snapshot_id)
    except ObjectNotFoundError as exc:
        raise SnapshotNotFoundError(f"removing snapshot {snapshot_id} - no such snapshot") from exc
