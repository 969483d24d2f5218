"""The volumes of a disk image: partitions (MBR with extended/logical ones, GPT) and LVM2
logical volumes, each a file-like window that cannot read outside itself.

Names: ``p1``, ``p2``... as Linux numbers partitions (MBR primaries 1-4 by slot, logical
partitions from 5 in chain order; GPT by entry), ``p0`` for a disk without a partition
table, and ``VG-LV`` (device-mapper style) for an LVM2 logical volume.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from stratavault._positional import PositionalReader
from stratavault.errors import SourceError
from stratavault.sources._flr_fs import detect_filesystem

__all__ = ["FlrVolume", "VolumeWindow", "list_volumes"]

_HEAD_BYTES = 0x10048 + 8
_EXTENDED = (0x05, 0x0F, 0x85)


@dataclass(slots=True)
class FlrVolume:
    """A partition or logical volume of a disk image."""

    name: str
    """``p1``..., ``p0`` for the whole disk, ``VG-LV`` for an LVM logical volume."""
    number: int
    """Partition number (0 for the whole disk and for logical volumes)."""
    offset: int
    """Byte offset on the disk (of its physical volume, for a logical volume)."""
    size_bytes: int
    type: str
    """Partition type: "0x83" (MBR), a GPT type GUID, "lvm" for a logical volume, "" for p0."""
    label: str = ""
    """GPT partition name, or the volume group for a logical volume."""
    filesystem: str = ""
    """What its first bytes say: "ext4", "ntfs", "lvm2", "swap"... or "" when unknown."""
    _open: Any = field(default=None, repr=False, compare=False)

    def open(self) -> BinaryIO:
        """A new read-only file object over the volume."""
        stream: BinaryIO = self._open()
        return stream

    def to_json(self) -> dict[str, Any]:
        """The form printed by ``ls --json``."""
        return {
            "name": self.name,
            "number": self.number,
            "offset": self.offset,
            "size": self.size_bytes,
            "partition_type": self.type,
            "label": self.label,
            "filesystem": self.filesystem,
        }


class VolumeWindow(PositionalReader):
    """Bytes ``offset`` .. ``offset + size`` of ``fh`` as a seekable file (never beyond).

    Uses ``fh.read_at(offset, size)`` when ``fh`` has it (position-free, thread-safe), else
    ``seek`` + ``read`` under a lock shared by all windows of the same ``fh``.
    """

    def __init__(self, fh: Any, offset: int, size: int, lock: threading.Lock) -> None:
        super().__init__()
        self._fh, self._offset, self._size = fh, offset, size
        self._lock = lock
        self._fh_read_at = getattr(fh, "read_at", None)

    @property
    def size(self) -> int:
        """Size of the volume in bytes."""
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` of the volume (never beyond its end)."""
        length = max(0, min(length, self._size - offset))
        if length == 0:
            return b""
        if self._fh_read_at is not None:
            data: bytes = self._fh_read_at(self._offset + offset, length)
            return data
        with self._lock:
            self._fh.seek(self._offset + offset)
            data = self._fh.read(length)
        return data


def _head(stream: Any) -> bytes:
    stream.seek(0)
    data: bytes = stream.read(_HEAD_BYTES)
    stream.seek(0)
    return data


def list_volumes(fh: Any, size_bytes: int, *, where: str) -> list[FlrVolume]:
    """The partitions of the disk ``fh`` (and the logical volumes in LVM2 physical volumes).

    A disk without a partition table is one volume ``p0``. ``SourceError`` naming
    ``where`` when the partition table is corrupt.
    """
    lock = threading.Lock()
    whole = VolumeWindow(fh, 0, size_bytes, lock)
    head = _head(whole)
    kind = detect_filesystem(head)
    if kind:  # a filesystem (or a PV) on the whole disk: no partition table
        return _with_lvm([_volume("p0", 0, 0, size_bytes, "", "", kind, fh, lock)], where)
    try:
        from dissect.volume.disk import Disk

        disk = Disk(whole)
        partitions = list(disk.partitions)
    except ImportError as exc:
        raise SourceError(f"reading partitions of {where} - dissect.volume is missing") from exc
    except Exception as exc:  # no table at all, or a corrupt one (RecursionError on a loop)
        if head[510:512] != b"\x55\xaa":  # no table, no filesystem this program knows
            return [_volume("p0", 0, 0, size_bytes, "", "", "", fh, lock)]
        raise SourceError(
            f"reading partitions of {where} - corrupt or unknown table: {exc}"
        ) from exc
    numbers = _mbr_numbers(disk.scheme, partitions)
    volumes = []
    for part, number in zip(partitions, numbers, strict=True):
        length = part.size
        if hasattr(part.raw, "last_lba"):  # GPT: the last LBA is inclusive (dissect drops it)
            length = (part.raw.last_lba - part.raw.first_lba + 1) * disk.sector_size
        end = min(part.offset + length, size_bytes)
        if part.offset >= size_bytes or end <= part.offset:
            raise SourceError(
                f"reading partitions of {where} - partition {number} at {part.offset} "
                f"lies outside the disk ({size_bytes} bytes)"
            )
        window = VolumeWindow(fh, part.offset, end - part.offset, lock)
        ptype = str(part.type) if not isinstance(part.type, int) else f"0x{part.type:02x}"
        volumes.append(
            _volume(
                f"p{number}",
                number,
                part.offset,
                end - part.offset,
                ptype,
                str(part.name or ""),
                detect_filesystem(_head(window)),
                fh,
                lock,
            )
        )
    return _with_lvm(volumes, where)


def _volume(
    name: str,
    number: int,
    offset: int,
    size: int,
    ptype: str,
    label: str,
    kind: str,
    fh: Any,
    lock: threading.Lock,
    *,
    start: int | None = None,
) -> FlrVolume:
    """A volume that reads ``size`` bytes of ``fh`` from ``start`` (default: ``offset``)."""
    at = offset if start is None else start
    return FlrVolume(
        name,
        number,
        offset,
        size,
        ptype,
        label,
        kind,
        _open=lambda: VolumeWindow(fh, at, size, lock),
    )


def _mbr_numbers(scheme: Any, partitions: list[Any]) -> list[int]:
    """Linux partition numbers: MBR primaries by slot, logical ones from 5; GPT as listed."""
    mbr = getattr(scheme, "mbr", None)
    if mbr is None or type(scheme).__name__ != "MBR":
        return [int(p.number) for p in partitions]
    by_offset = {
        int(entry.sector_ofs) * scheme.sector_size + scheme.offset: slot + 1
        for slot, entry in enumerate(mbr.part)
        if entry.type and entry.type not in _EXTENDED
    }
    numbers, logical = [], 5
    for part in partitions:
        slot = by_offset.pop(part.offset, None)
        if slot is None:
            slot, logical = logical, logical + 1
        numbers.append(slot)
    return numbers


def _with_lvm(volumes: list[FlrVolume], where: str) -> list[FlrVolume]:
    """``volumes`` followed by the logical volumes of those that are LVM2 physical volumes."""
    result = list(volumes)
    for volume in volumes:
        if volume.filesystem != "lvm2":  # the PV label, whatever the partition type says
            continue
        result.extend(_logical_volumes(volume, f"{where} partition {volume.name}"))
    return result


def _logical_volumes(pv: FlrVolume, where: str) -> list[FlrVolume]:
    try:
        from dissect.volume.lvm import LVM2

        lvm = LVM2(pv.open())
        vg = lvm.volume_group
        found = []
        for lv in (vg.logical_volumes or {}).values():
            if not lv.is_visible:
                continue
            found.append((lv, lv.open()))
    except Exception as exc:
        raise SourceError(f"reading LVM2 metadata of {where} - corrupt: {exc}") from exc
    volumes = []
    for lv, stream in found:
        name = f"{vg.name.replace('-', '--')}-{lv.name.replace('-', '--')}"
        size = int(getattr(stream, "size", 0) or 0)
        lock = threading.Lock()
        head = _head(VolumeWindow(stream, 0, size, lock))
        volumes.append(
            _volume(
                name,
                0,
                pv.offset,
                size,
                "lvm",
                vg.name,
                detect_filesystem(head),
                stream,
                lock,
                start=0,
            )
        )
    return volumes
