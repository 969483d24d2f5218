"""What the disk commands load while the key is derived (``open_repo(preload=...)``).

A disk command's memory peak comes with its data, not at start-up, so it need not wait
for the key before importing numpy, its job and (when QEMU is driven) ``qemu.qmp``: a
thread imports them while Argon2id runs without the GIL.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["backup_modules", "has_image_magic", "restore_modules"]

_QMP = ("qemu.qmp",)
_IMAGE_MAGICS = (b"QFI\xfb", b"KDMV", b"# Disk D", b"vhdxfile", b"<<< ", b"conectix", b"QED\x00")
"""How qcow2, vmdk, vhdx, vdi, vpc and qed files start: these are opened through
qemu-storage-daemon, driven over QMP (raw files and devices are read directly)."""


def has_image_magic(path: Path) -> bool:
    """Whether ``path`` looks like an image format QEMU must open (a hint for preloading
    only: the command itself asks ``qemu-img``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:  # a FIFO given by mistake must not block here (the job refuses it)
        mode = os.fstat(fd).st_mode
        regular = stat.S_ISREG(mode) or stat.S_ISBLK(mode)
        return regular and os.read(fd, 8).startswith(_IMAGE_MAGICS)
    except OSError:
        return False
    finally:
        os.close(fd)


def backup_modules(
    images: Iterable[Path] = (), *, vm: bool = False, qmp: bool = False
) -> tuple[str, ...]:
    """What ``backup image IMAGES`` / ``backup vm`` (``vm``; ``qmp``: driven over QMP)
    loads."""
    job = "stratavault.jobs._backup_vm" if vm else "stratavault.jobs._backup_images"
    modules = ("stratavault.repo._repository", job)
    return modules + _QMP if qmp or any(map(has_image_magic, images)) else modules


def restore_modules(target: Path | None, *, qcow2: bool) -> tuple[str, ...]:
    """What ``restore disk`` onto ``target`` (an image file, or a new qcow2) loads."""
    modules = ("stratavault.repo._repository", "stratavault.jobs._restore_disk")
    image = qcow2 or (target is not None and has_image_magic(target))
    return modules + _QMP if image else modules
