"""``open_storage``: a backend from a location string given by the user."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from stratavault._defaults import default_cache_dir
from stratavault.errors import UsageError
from stratavault.storage._base import Storage
from stratavault.storage._cache import CachedStorage
from stratavault.storage._local import LocalStorage
from stratavault.storage._memory import MemoryStorage
from stratavault.storage._retry import RetryingStorage

__all__ = ["ENV_S3_ENDPOINT", "open_storage"]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
ENV_S3_ENDPOINT = "STRATAVAULT_S3_ENDPOINT"
"""Endpoint of ``s3://bucket`` locations (else ``AWS_ENDPOINT_URL``, else AWS)."""
_ENV_CACHE_DIR = "STRATAVAULT_CACHE_DIR"  # the command line's cache folder (cli/_context.py)
_S3_OPTIONS = {"region", "profile", "lock-days", "path-style"}


def open_storage(location: str, *, cache_dir: Path | bool | None = True) -> Storage:
    """Return the backend for ``location``.

    - ``memory:``: a new, empty :class:`MemoryStorage` (each call a different one);
    - ``file:///abs/path`` or a plain path (``/srv/repo``, ``repo``, ``~/repo``):
      a :class:`LocalStorage` at that folder, made absolute;
    - ``s3:https://host:port/bucket/prefix``, or ``s3://bucket/prefix`` with the
      endpoint from ``STRATAVAULT_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL`` (AWS when
      neither is set): an :class:`S3Storage` inside a :class:`RetryingStorage`, inside a
      :class:`CachedStorage`. Options as a query: ``?region=R&profile=P&lock-days=N
      &path-style=0|1``. Credentials come from the usual AWS places (docs/s3.md).

    ``cache_dir`` is the folder of local caches for remote backends: a path; True
    (the default) for ``STRATAVAULT_CACHE_DIR`` or ``$XDG_CACHE_HOME/stratavault`` or
    ``~/.cache/stratavault``; None or False for no cache. Anything else raises
    :class:`UsageError`. A folder whose name looks like a scheme (``a:b``) is
    written ``./a:b``.
    """
    match = _SCHEME.match(location)
    if match is None:
        if not location:
            raise UsageError("storage location is empty")
        return LocalStorage(Path(location).expanduser().absolute())
    scheme = match.group(1).lower()
    opener = _OPENERS.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}:" for s in _OPENERS)
        raise UsageError(
            f"storage location {location!r}: unknown scheme {scheme!r} "
            f"(known: a path, {known}; write ./{location} for a folder of that name)"
        )
    return opener(location, _cache_root(cache_dir))


def _open_memory(location: str, cache_root: Path | None) -> Storage:
    if location.lower() != "memory:":
        raise UsageError(f"storage location {location!r}: write just 'memory:'")
    return MemoryStorage()


def _open_file(location: str, cache_root: Path | None) -> Storage:
    url = urlsplit(location)
    if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
        raise UsageError(
            f"storage location {location!r}: a file URL needs an absolute local path, "
            "like file:///srv/repo"
        )
    return LocalStorage(Path(unquote(url.path)))


def _cache_root(cache_dir: Path | bool | None) -> Path | None:
    if cache_dir is None or cache_dir is False:
        return None
    if cache_dir is True:
        env = os.environ.get(_ENV_CACHE_DIR)
        if env:
            return Path(env)
        try:
            return default_cache_dir()
        except RuntimeError:  # no home folder to find it in: no cache
            return None
    return Path(cache_dir)


def _open_s3(location: str, cache_root: Path | None) -> Storage:
    """``s3:https://host:port/bucket/prefix`` or ``s3://bucket/prefix``."""
    from stratavault.storage._s3 import S3Storage  # boto3 only for S3 locations

    rest = location[len("s3:") :]
    url = urlsplit(rest)
    if rest.startswith("//"):
        endpoint = os.environ.get(ENV_S3_ENDPOINT) or os.environ.get("AWS_ENDPOINT_URL") or None
        bucket, path = url.netloc, url.path
    elif url.scheme in ("http", "https") and url.netloc:
        endpoint = f"{url.scheme}://{url.netloc}"
        bucket, _, path = url.path.lstrip("/").partition("/")
    else:
        raise UsageError(
            f"storage location {location!r}: write s3:https://host:port/bucket/prefix "
            f"or s3://bucket/prefix (endpoint from {ENV_S3_ENDPOINT})"
        )
    options = dict(parse_qsl(url.query, keep_blank_values=True))
    if unknown := set(options) - _S3_OPTIONS:
        raise UsageError(
            f"storage location {location!r}: unknown option(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_S3_OPTIONS))})"
        )
    if len(bucket) < 3:
        raise UsageError(f"storage location {location!r}: no bucket name (3 or more characters)")
    try:
        lock_days = int(options["lock-days"]) if "lock-days" in options else None
    except ValueError:
        raise UsageError(f"storage location {location!r}: lock-days must be a number") from None
    path_style = {"": None, "1": True, "true": True, "0": False, "false": False}.get(
        options.get("path-style", "").lower()
    )
    storage: Storage = RetryingStorage(
        S3Storage(
            bucket, unquote(path).strip("/"), endpoint_url=endpoint,
            region=options.get("region") or None, profile=options.get("profile") or None,
            lock_days=lock_days, path_style=path_style,
        )
    )  # fmt: skip
    if cache_root is None:
        return storage
    key = hashlib.sha256(storage.properties.location.encode()).hexdigest()[:32]
    return CachedStorage(storage, cache_root / "objects" / key)


_OPENERS: dict[str, Callable[[str, Path | None], Storage]] = {
    "memory": _open_memory,
    "file": _open_file,
    "s3": _open_s3,
}
"""Scheme -> opener(location, cache folder or None); local backends need no cache."""
