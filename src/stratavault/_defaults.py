"""Defaults that several layers share and the command line shows in ``--help``.

In a module of their own, importing nothing heavy, so that building the parser does not
load the (heavy) modules that use them.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_DISK_CHUNK_BYTES",
    "DEFAULT_DISK_FRAME_BYTES",
    "DEFAULT_LIBVIRT_URI",
    "DISK_FORMATS",
    "IMAGE_FORMATS",
    "default_cache_dir",
]

DEFAULT_DISK_CHUNK_BYTES = 64 << 10
"""Chunk size of new disks (measured trade-off in docs/format.md)."""

DEFAULT_DISK_FRAME_BYTES = 1 << 20
"""New neighbouring disk chunks are compressed together in frames of up to this size."""

DEFAULT_LIBVIRT_URI = "qemu:///system"
"""The libvirt connection used when none is given."""

DISK_FORMATS = ("raw", "qcow2")
"""Formats a disk can be restored to."""

IMAGE_FORMATS = ("qcow2", "raw", "vmdk", "vhdx", "vdi")
"""Formats an image is backed up from (all but raw through qemu-storage-daemon)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stratavault`` or ``~/.cache/stratavault``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stratavault"
