"""Defaults and choices that the parser shows in ``--help``, copied from the layers below.

Their own modules (``jobs._backup_disk``, ``jobs._restore_disk``, ``sources._libvirt``) load
numpy, the repository and the NBD code; building the parser must not, so that every command
starts fast. tests/e2e/test_cli_startup.py checks that the copies equal the originals.
"""

from __future__ import annotations

__all__ = ["DEFAULT_DISK_CHUNK_BYTES", "DEFAULT_LIBVIRT_URI", "DISK_FORMATS"]

DEFAULT_DISK_CHUNK_BYTES = 256 << 10  # stratavault.jobs.DEFAULT_DISK_CHUNK_BYTES
DEFAULT_LIBVIRT_URI = "qemu:///system"  # stratavault.sources.DEFAULT_LIBVIRT_URI
DISK_FORMATS = ("raw", "qcow2")  # stratavault.jobs.DISK_FORMATS
