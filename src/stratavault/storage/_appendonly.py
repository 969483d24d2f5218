"""``AppendOnlyStorage``: new objects may be added, existing ones never changed or removed.

This is what a machine that may be compromised should get (a guest pushing file
backups): it can add snapshots but cannot destroy history. The one exception is
``locks/``: a backup must remove (and may refresh) its own lock, or every later
operation would find the repository locked. restic's rest-server makes the same
exception in ``--append-only`` mode. A lock holds no data, so the exception lets an
attacker at most remove other clients' locks, never backed-up data.
"""

from __future__ import annotations

from stratavault.errors import ObjectExistsError, PermissionDeniedError
from stratavault.storage._base import check_name
from stratavault.storage._wrapper import StorageWrapper

__all__ = ["LOCKS_PREFIX", "AppendOnlyStorage"]

LOCKS_PREFIX = "locks/"
"""Objects under this prefix may be deleted and overwritten through an append-only storage."""


class AppendOnlyStorage(StorageWrapper):
    """Refuses delete and overwrite (:class:`PermissionDeniedError`) except under ``locks/``.

    ``put(..., overwrite=True)`` of a name that does not exist yet creates it; of a
    name that exists with exactly the same bytes it succeeds without change (so a
    retried put stays idempotent); with different bytes it is refused.
    """

    def put(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Create ``name``; overwrite only under ``locks/`` or with identical bytes."""
        if not overwrite or _is_lock(name):
            self.inner.put(name, data, overwrite=overwrite)
            return
        try:
            self.inner.put(name, data, overwrite=False)
        except ObjectExistsError:
            if self.inner.get(name) != data:
                raise PermissionDeniedError(
                    f"put {name} at {self.properties.location} - append-only: "
                    "refusing to overwrite an existing object"
                ) from None

    def delete(self, name: str) -> None:
        """Remove ``name`` only if it is under ``locks/``."""
        if not _is_lock(name):
            raise PermissionDeniedError(
                f"delete {name} at {self.properties.location} - append-only: "
                f"only objects under {LOCKS_PREFIX} may be deleted"
            )
        self.inner.delete(name)


def _is_lock(name: str) -> bool:
    return check_name(name).startswith(LOCKS_PREFIX)
