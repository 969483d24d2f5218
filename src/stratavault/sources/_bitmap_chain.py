"""The chain of persistent dirty bitmaps that gives each backup its changed blocks.

Naming: one bitmap per disk, ``<prefix>-<n>`` (``stratavault-7``), tracks every
write since the backup that created it; the snapshot of that backup records the
name. The next backup expects that name, and in its transaction adds
``<prefix>-<n+1>`` (recording) and disables ``<prefix>-<n>`` (frozen: exactly the
changes between the two points in time), which it exports. On success
``<prefix>-<n>`` is removed; on failure ``<prefix>-<n+1>`` is merged back into
``<prefix>-<n>``, which is enabled again and keeps its name, so the parent
snapshot still matches it and no change is lost.

This module decides, per disk, what to do (pure: no QEMU calls).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stratavault.errors import SourceError
from stratavault.sources._vm import DirtyBitmap, VmDisk

__all__ = ["DEFAULT_BITMAP_PREFIX", "BitmapPlan", "plan_bitmaps"]

DEFAULT_BITMAP_PREFIX = "stratavault"


@dataclass(frozen=True)
class BitmapPlan:
    """What one backup does with the bitmaps of one disk."""

    frozen: str | None
    """Existing bitmap to disable in the transaction and export (changes since the parent)."""
    new: str | None
    """Bitmap to add (recording) in the transaction: the chain name the new snapshot records."""
    persistent: bool
    """Whether ``new`` is stored in the image (qcow2 only)."""
    remove_first: tuple[str, ...]
    """Unusable bitmaps of this chain (inconsistent, stale) to remove before the transaction."""
    recover_from: str | None
    """A bitmap left by an interrupted backup, to merge into ``frozen`` before the transaction."""
    full_read_reason: str | None
    """Why every allocated extent must be read (no usable bitmap); None when ``frozen`` is set."""


def generation(name: str, prefix: str) -> int | None:
    """The ``n`` of a chain bitmap ``<prefix>-<n>``; None for other names."""
    match = re.fullmatch(re.escape(prefix) + r"-(\d+)", name)
    return int(match.group(1)) if match else None


def plan_bitmaps(disk: VmDisk, expected: str | None, prefix: str) -> BitmapPlan:
    """Decide the bitmap actions for ``disk``.

    ``expected`` is the chain name the parent snapshot recorded for this disk (None on
    a first backup). A missing, inconsistent or interrupted bitmap is reported in
    ``full_read_reason`` and a fresh chain starts.
    """
    own = {b.name: b for b in disk.bitmaps if generation(b.name, prefix) is not None}
    if disk.read_only:
        return BitmapPlan(None, None, False, (), None, "read-only disk: no bitmap, full read")
    last = max([generation(n, prefix) or 0 for n in own] + [_gen(expected, prefix)])
    new = f"{prefix}-{last + 1}"
    persistent = disk.format == "qcow2"
    frozen, recover, reason = _usable(disk, own.get(expected or ""), expected, prefix)
    keep = {frozen, recover}
    stale = tuple(sorted(n for n in own if n not in keep))
    return BitmapPlan(frozen, new, persistent, stale, recover, reason)


def _gen(name: str | None, prefix: str) -> int:
    return (generation(name, prefix) or 0) if name else 0


def _usable(
    disk: VmDisk, bitmap: DirtyBitmap | None, expected: str | None, prefix: str
) -> tuple[str | None, str | None, str | None]:
    """(frozen, recover_from, full_read_reason) for the expected bitmap."""
    if expected is None:
        return None, None, "first backup of this disk: no bitmap yet"
    if bitmap is None:
        return None, None, (
            f"bitmap {expected} expected by the previous snapshot is missing"
            " (QEMU exited uncleanly, or the disk was replaced)"
        )  # fmt: skip
    if bitmap.inconsistent:
        return None, None, (
            f"bitmap {expected} is inconsistent (QEMU exited uncleanly); removed,"
            " a new chain starts"
        )  # fmt: skip
    if bitmap.busy:
        raise SourceError(
            f"starting a backup of {disk.device} - bitmap {expected} is busy: another backup"
            " of this VM is running, or one died and left its exports (remove_backup_leftovers)"
        )
    if bitmap.recording:
        return expected, None, None
    # Disabled: an earlier backup was interrupted before it could merge back.
    successor = f"{prefix}-{_gen(expected, prefix) + 1}"
    later = disk.bitmap(successor)
    if later is not None and later.recording and not later.inconsistent and not later.busy:
        return expected, successor, None
    return None, None, (
        f"bitmap {expected} was left disabled by an interrupted backup and its successor"
        " is gone; removed, a new chain starts"
    )  # fmt: skip
