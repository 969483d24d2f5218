"""The chain of persistent dirty bitmaps that gives each backup its changed blocks.

Naming: one bitmap per disk, ``<prefix>-<n>-<token>`` (``stratavault-7-3f9a0c21d4e8``),
tracks every write since the backup that created it; the snapshot of that backup
records the name. The token is random, so a bitmap of another disk (another image
backed up under the same name, or restored onto) never passes for it; names without a
token (``stratavault-7``, before 2026-12-07) are still recognised. The next backup
expects that name, and in its transaction adds ``<prefix>-<n+1>-<new token>``
(recording) and disables ``<prefix>-<n>-...`` (frozen: exactly the changes between the
two points in time), which it exports. On success the frozen one is removed; on failure
the new one is merged back into it, which is enabled again and keeps its name, so the
parent snapshot still matches it and no change is lost.

This module decides, per disk, what to do (pure: no QEMU calls).
"""

from __future__ import annotations

import re
import secrets
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
    """The ``n`` of a chain bitmap ``<prefix>-<n>-<token>`` (or ``<prefix>-<n>``); None for
    other names."""
    match = re.fullmatch(re.escape(prefix) + r"-(\d+)(?:-[0-9a-f]{12})?", name)
    return int(match.group(1)) if match else None


def chain_name(prefix: str, n: int) -> str:
    """A new name for generation ``n`` of a chain, unique to it (a random token)."""
    return f"{prefix}-{n}-{secrets.token_hex(6)}"


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
    new = chain_name(prefix, last + 1)
    persistent = disk.format == "qcow2"
    frozen, recover, reason = _usable(disk, own, expected, prefix)
    keep = {frozen, recover}
    stale = tuple(sorted(n for n in own if n not in keep))
    return BitmapPlan(frozen, new, persistent, stale, recover, reason)


def _gen(name: str | None, prefix: str) -> int:
    return (generation(name, prefix) or 0) if name else 0


def _usable(
    disk: VmDisk, own: dict[str, DirtyBitmap], expected: str | None, prefix: str
) -> tuple[str | None, str | None, str | None]:
    """(frozen, recover_from, full_read_reason) for the expected bitmap, among the chain
    bitmaps ``own`` of the disk."""
    bitmap = own.get(expected or "")
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
    following = _gen(expected, prefix) + 1
    for later in own.values():
        usable = later.recording and not later.inconsistent and not later.busy
        if generation(later.name, prefix) == following and usable:
            return expected, later.name, None
    return None, None, (
        f"bitmap {expected} was left disabled by an interrupted backup and its successor"
        " is gone; removed, a new chain starts"
    )  # fmt: skip
