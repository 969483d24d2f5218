"""The public ``config`` object: made by ``init``, read (and checked) by every open."""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

from stratavault.errors import (
    IntegrityError,
    ObjectNotFoundError,
    RepositoryNotFoundError,
    UnsupportedFormatError,
)
from stratavault.repo import _formats as F
from stratavault.storage import Storage

__all__ = ["new_config", "read_config"]


def new_config(now: float, immutable_days: int | None) -> dict[str, Any]:
    """The config of a new repository (docs/format.md, "config")."""
    config: dict[str, Any] = {
        "version": F.FORMAT_VERSION,
        "id": os.urandom(32).hex(),
        "created": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
        "chunker": {
            "files": {"algorithm": "fastcdc", "min": 256 << 10, "avg": 1 << 20, "max": 4 << 20},
            "disks": {"algorithm": "fixed", "size": 64 << 10},
        },
        "defaults": {"compression": "zstd", "level": 3, "pack_bytes": F.PACK_TARGET_BYTES},
    }
    if immutable_days is not None:
        config["immutable_days"] = immutable_days
    return config


def read_config(storage: Storage) -> dict[str, Any]:
    """The public config object; RepositoryNotFoundError / UnsupportedFormatError."""
    where = storage.properties.location
    try:
        raw = storage.get(F.CONFIG_NAME)
    except ObjectNotFoundError as exc:
        raise RepositoryNotFoundError(f"opening repository at {where} - no config object") from exc
    try:
        config: dict[str, Any] = json.loads(raw)
        version = config["version"]
        if not isinstance(version, int) or not isinstance(config["id"], str):
            raise ValueError("version or id has the wrong type")
        if len(config["id"]) != 64 or config["id"].strip("0123456789abcdef"):
            raise ValueError(f"id {config['id']!r} is not 64 hex digits")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"reading config of repository at {where} - malformed: {exc}") from exc
    if version > F.FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"opening repository at {where} - format version {version} is newer than "
            f"{F.FORMAT_VERSION}, the newest this program knows; upgrade stratavault"
        )
    return config
