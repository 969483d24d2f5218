"""``open_storage``: a backend from a location string given by the user."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from stratavault.errors import UsageError
from stratavault.storage._base import Storage
from stratavault.storage._local import LocalStorage
from stratavault.storage._memory import MemoryStorage

__all__ = ["open_storage"]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")


def open_storage(location: str) -> Storage:
    """Return the backend for ``location``.

    - ``memory:``: a new, empty :class:`MemoryStorage` (each call a different one);
    - ``file:///abs/path`` or a plain path (``/srv/repo``, ``repo``, ``~/repo``):
      a :class:`LocalStorage` at that folder, made absolute;

    anything else raises :class:`UsageError`. A folder whose name looks like a
    scheme (``a:b``) is written ``./a:b``.
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
    return opener(location)


def _open_memory(location: str) -> Storage:
    if location.lower() != "memory:":
        raise UsageError(f"storage location {location!r}: write just 'memory:'")
    return MemoryStorage()


def _open_file(location: str) -> Storage:
    url = urlsplit(location)
    if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
        raise UsageError(
            f"storage location {location!r}: a file URL needs an absolute local path, "
            "like file:///srv/repo"
        )
    return LocalStorage(Path(unquote(url.path)))


_OPENERS: dict[str, Callable[[str], Storage]] = {
    "memory": _open_memory,
    "file": _open_file,
    # "s3": S3 (any S3-compatible cluster) is added here, in its own module _s3.py.
}
