"""Use case: back up disk images (raw files and block devices read directly; qcow2, vmdk,
vhdx, vdi through qemu-storage-daemon; a qcow2's dirty bitmap makes the next backup an
incremental). Apart from the VM backup: an image backup loads nothing of libvirt."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from stratavault._defaults import IMAGE_FORMATS
from stratavault.errors import SourceError, UsageError
from stratavault.jobs._backup_disk import (
    BackupDisksOptions,
    DiskSource,
    backup_disks,
    latest_disk_snapshot,
)
from stratavault.jobs._nbd_source import NbdDiskSource
from stratavault.jobs._progress import Cancellation, Progress
from stratavault.repo import Repository
from stratavault.snapshot import Snapshot, find_snapshot
from stratavault.sources import ImageExport, RawDiskSource, probe_image

__all__ = ["backup_images", "scratch_folder"]


@contextlib.contextmanager
def scratch_folder(given: Path | None) -> Any:
    """``given`` (made if missing), else a temporary folder removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="stratavault-") as tmp:
        yield Path(tmp)


def _check_images(images: Sequence[Path]) -> None:
    """Each image a regular file or a block device (a FIFO would block the probe), and no
    file given twice (its second opening would find the first's lock)."""
    seen: dict[str, Path] = {}
    for image in images:
        try:
            st = image.stat()
        except OSError as exc:
            raise SourceError(f"backing up image {image} - {exc.strerror or exc}") from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise SourceError(f"backing up image {image} - not a regular file or block device")
        real = os.path.realpath(image)
        if real in seen:
            raise UsageError(f"backing up images: {seen[real]} and {image} are the same file")
        seen[real] = image


def _probed_format(image: Path) -> str:
    """The probed format of an image that names no other file; ``UsageError`` for one that
    does (a backing file, vmdk extents): the file's own header decides what is read, and
    a guest can write any header into its raw disk, so the caller must say the format."""
    info = probe_image(image)
    if info.format != "raw" and info.references:
        raise UsageError(
            f"image {image} reads as {info.format} naming {', '.join(info.references)}: "
            f"give --format {info.format} to back it up with the files it names, or "
            "--format raw for its own bytes (a guest can write such a header into a raw disk)"
        )
    return info.format


def backup_images(
    repo: Repository,
    images: Sequence[Path],
    options: BackupDisksOptions,
    *,
    names: Sequence[str] = (),
    image_format: str | None = None,
    scratch_dir: Path | None = None,
    progress: Progress | None = None,
    cancel: Cancellation | None = None,
) -> Snapshot:
    """Back up disk images (raw files and block devices read directly; qcow2, vmdk, vhdx,
    vdi and others through qemu-storage-daemon) into one snapshot; ``names`` names the
    disks (default: the file names). A qcow2 keeps a persistent dirty bitmap, so its next
    backup reads only what changed.

    ``image_format`` is the format of every image; ``None`` asks ``qemu-img`` (block
    devices: raw). Give it for an image a guest wrote: a raw disk that starts with another
    format's header would be probed as that format, its backing file (a path the guest
    chose) opened and backed up."""
    if names and len(names) != len(images):
        raise UsageError(f"{len(names)} names given for {len(images)} images")
    _check_images([Path(i) for i in images])
    if image_format is not None and image_format not in IMAGE_FORMATS:
        raise UsageError(f"image format {image_format!r}: expected one of {IMAGE_FORMATS}")
    paths = options.paths or tuple(str(Path(i).absolute()) for i in images)
    if options.parent is None:
        parent = latest_disk_snapshot(repo, options.host, list(paths))
    else:
        parent = find_snapshot(repo, options.parent)
    # The bitmap a parent disk recorded serves the disk of the same path and name only:
    # the new index reuses the entries of the parent's disk of that name.
    recorded = {(d.path, d.name): d.bitmap for d in parent.disks if d.bitmap} if parent else {}
    if parent is not None:
        options = replace(options, parent=parent.id)
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(scratch_folder(scratch_dir))
        named = [
            (Path(image), names[n] if names else Path(image).name) for n, image in enumerate(images)
        ]
        opened = [
            _image_source(
                stack, image, name, image_format, scratch / f"image{number}",
                recorded.get((str(image.absolute()), name)),
            )
            for number, (image, name) in enumerate(named)
        ]  # fmt: skip
        # The layout, as for a VM: restore vm gives each disk its format back
        config = {
            "disks": [layout for _source, layout, _why in opened],
            "full_read": {layout["device"]: why for _source, layout, why in opened},
        }
        options = replace(options, paths=paths, vm_config=config)
        sources = [source for source, _layout, _why in opened]
        return backup_disks(repo, sources, options, progress=progress, cancel=cancel)


def _image_source(
    stack: contextlib.ExitStack,
    image: Path,
    name: str,
    image_format: str | None,
    scratch: Path,
    bitmap: str | None,
) -> tuple[DiskSource, dict[str, str], str | None]:
    """The source of one image, closed with ``stack``: a raw file or device read directly,
    another format through a private qemu-storage-daemon (``bitmap``: the one the parent
    snapshot recorded for it). With it, the disk's layout (name, file, format) and why it
    is read in full when it has a bitmap chain that could not be used."""
    fmt = image_format or ("raw" if image.is_block_device() else _probed_format(image))
    layout = {"device": name, "filename": str(image.absolute()), "format": fmt}
    if fmt == "raw":
        raw = RawDiskSource(image, name=name)
        stack.callback(raw.close)
        return raw, layout, None
    export = stack.enter_context(ImageExport(image, scratch, fmt=fmt, expected_bitmap=bitmap))
    assert export.export is not None
    source = NbdDiskSource(export.export)
    source.name = name
    source.path = str(image.absolute())
    stack.callback(source.close)
    return source, layout, export.export.full_read_reason
