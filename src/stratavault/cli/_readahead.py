"""Cold-start readahead: the files a command loaded last time are read ahead this time.

From a cold page cache a short command (an incremental disk backup, a restore of what a
dirty bitmap marks) waits longer for its own files than for its data: it loads ~600
modules and the native libraries of numpy and cryptography one after the other, and a
native library's pages come in while the import holds the GIL. So at the end of a
command the files it loaded (the modules' bytecode, the shared libraries mapped) are
listed in a manifest under the cache folder, one per command; the next run of that
command starts a thread that asks the kernel to read them ahead (``posix_fadvise``
``WILLNEED``, which returns before the reads finish), and its imports find them in
memory: 20-40 ms of a 0.4 s incremental backup here (bench/disks.py).

The manifest is only a hint: a missing, stale or damaged one costs nothing but the
readahead, and its paths are never read into the process. ``--no-cache`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["loaded_files", "manifest_path", "read_ahead", "record"]

_FOLDER = "startup"
_MAX_FILES = 4096
_MAX_MANIFEST_BYTES = 1 << 20


def manifest_path(cache_dir: Path | None, command: str) -> Path | None:
    """Where the manifest of ``command`` (a name like ``backup-run_image``) lives; ``None``
    without a cache folder."""
    if cache_dir is None or not command.replace("-", "").replace("_", "").isalnum():
        return None
    return cache_dir / _FOLDER / f"{command}.files"


def read_ahead(manifest: Path) -> threading.Thread | None:
    """Start a daemon thread that reads ahead the files ``manifest`` lists (none: no
    thread); it is never waited for."""
    paths = _read_manifest(manifest)
    if not paths:
        return None
    thread = threading.Thread(target=_advise, args=(paths,), name="readahead", daemon=True)
    thread.start()
    return thread


_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


def _advise(paths: list[str]) -> None:
    """Read ahead each path that is a regular file. Nothing else is even opened: opening a
    device can act (a watchdog starts, a tape rewinds), and a manifest is only a hint."""
    for path in paths:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            continue  # gone since (an upgrade): nothing to read ahead
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_manifest(manifest: Path) -> list[str]:
    """The absolute paths a manifest lists, at most ``_MAX_FILES`` (none when it is
    missing, too large or not text)."""
    try:
        with manifest.open("rb") as f:
            data = f.read(_MAX_MANIFEST_BYTES + 1)
        text = data.decode()
    except (OSError, UnicodeDecodeError):
        return []
    if len(data) > _MAX_MANIFEST_BYTES:
        return []
    return [p for p in text.split("\n") if p.startswith("/") and "\0" not in p][:_MAX_FILES]


def loaded_files() -> Iterator[str]:
    """The files this process loaded, in the order it loaded them: each module's bytecode
    (its source when it has none cached) and extension, then the shared libraries mapped."""
    seen: set[str] = set()
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        if spec is None or not spec.has_location:
            continue
        path = spec.cached or spec.origin
        if path and path.startswith("/") and path not in seen:
            seen.add(path)
            yield path
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read().splitlines()
    except OSError:
        return
    for line in maps:
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if path.startswith("/") and ".so" in path and path not in seen:
            seen.add(path)
            yield path


def record(manifest: Path) -> None:
    """Add the files this process loaded to ``manifest`` when it lacks some: they go
    first, in load order, followed by what it listed before (up to ``_MAX_FILES``).
    Written atomically; a cache folder that cannot be written is left alone."""
    old = _read_manifest(manifest)
    now = list(loaded_files())
    known = set(old)
    if all(p in known for p in now):
        return
    listed = set(now)
    text = "\n".join((now + [p for p in old if p not in listed])[:_MAX_FILES]) + "\n"
    tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
    try:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, manifest)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
