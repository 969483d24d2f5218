"""The one error tree of Stratavault, with the exit code of each branch.

Every error the program raises on purpose derives from :class:`StratavaultError`.
The command line maps an error to its class's ``exit_code``; messages name the
operation, the object and the cause ("reading pack data/ab/abcd… - truncated").

    StratavaultError                       exit 1  fatal error
    ├── UsageError                         exit 2  bad option or argument
    ├── PassphraseError                    exit 3  wrong passphrase / no key slot opens
    │   └── NoPassphraseError              exit 3  no passphrase given anywhere
    ├── RepositoryError                    exit 1  generic repository problem
    │   ├── RepositoryNotFoundError        exit 10 no repository at that place
    │   ├── RepositoryExistsError          exit 1  init on an existing repository
    │   ├── RepositoryLockedError          exit 11 another process holds a conflicting lock
    │   ├── UnsupportedFormatError         exit 13 repository written by a newer format version
    │   ├── SnapshotNotFoundError          exit 1  no snapshot matches (also LookupError)
    │   └── DataDamagedError               exit 12 corrupt, truncated or missing data
    │       ├── ChunkNotFoundError         exit 12 a referenced chunk is not in the index
    │       ├── IntegrityError             exit 12 authentication or hash check failed
    │       └── KeyFileDamagedError        exit 12 a key file fails its own checksum
    ├── StorageError                       exit 1  backend failed
    │   ├── ObjectNotFoundError            exit 1  no object of that name (also FileNotFoundError)
    │   ├── ObjectExistsError              exit 1  put of a name that exists where refused
    │   ├── PermissionDeniedError          exit 1  backend or wrapper refused the operation
    │   │   └── ObjectLockedError          exit 1  object lock retention forbids deleting it yet
    │   ├── TransientStorageError          exit 1  may succeed when retried
    │   └── StorageFullError               exit 14 no space left on the backend
    ├── SourceError                        exit 1  reading what is backed up failed
    ├── NbdError                           exit 15 an NBD peer failed, refused or went silent
    │   └── NbdProtocolError               exit 15 an NBD peer sent malformed or truncated data
    ├── IncompleteSnapshotError            exit 4  snapshot saved, but some files were unreadable
    ├── VerificationFailedError            exit 16 verify --boot: the VM showed no sign of life
    ├── RestoreError                       exit 1  restore could not write something
    │   └── UnsafePathError                exit 1  a name would escape the restore target
    └── Interrupted                        exit 130 stopped by Ctrl-C, repository left consistent
"""

from __future__ import annotations

import datetime

__all__ = [
    "EXIT_CODES",
    "ChunkNotFoundError",
    "DataDamagedError",
    "IncompleteSnapshotError",
    "IntegrityError",
    "Interrupted",
    "KeyFileDamagedError",
    "NbdError",
    "NbdProtocolError",
    "NoPassphraseError",
    "ObjectExistsError",
    "ObjectLockedError",
    "ObjectNotFoundError",
    "PassphraseError",
    "PermissionDeniedError",
    "RepositoryError",
    "RepositoryExistsError",
    "RepositoryLockedError",
    "RepositoryNotFoundError",
    "RestoreError",
    "SnapshotNotFoundError",
    "SourceError",
    "StorageError",
    "StorageFullError",
    "StratavaultError",
    "TransientStorageError",
    "UnsafePathError",
    "UnsupportedFormatError",
    "UsageError",
    "VerificationFailedError",
]


class StratavaultError(Exception):
    """Base of every error Stratavault raises on purpose; exit code 1 (fatal)."""

    exit_code = 1


class UsageError(StratavaultError, ValueError):
    """A command-line option or argument is wrong."""

    exit_code = 2


class PassphraseError(StratavaultError):
    """No key slot of the repository opens with the given passphrase."""

    exit_code = 3


class NoPassphraseError(PassphraseError):
    """No passphrase was given by option, file, command or environment."""


class RepositoryError(StratavaultError):
    """Something is wrong with the repository as a whole."""


class RepositoryNotFoundError(RepositoryError, FileNotFoundError):
    """There is no repository at the given place (no config object)."""

    exit_code = 10


class RepositoryExistsError(RepositoryError, FileExistsError):
    """``init`` found a repository already there."""


class RepositoryLockedError(RepositoryError):
    """Another process holds a lock that conflicts with the one asked for."""

    exit_code = 11


class UnsupportedFormatError(RepositoryError):
    """The repository (or an object in it) has a format version this program does not know."""

    exit_code = 13


class SnapshotNotFoundError(RepositoryError, LookupError):
    """No snapshot matches the given id, prefix or filter."""


class DataDamagedError(RepositoryError):
    """Data in the repository is corrupt, truncated or missing."""

    exit_code = 12


class ChunkNotFoundError(DataDamagedError, LookupError):
    """A chunk referenced by a snapshot is not in any pack the index knows."""


class IntegrityError(DataDamagedError):
    """An object failed authentication or its content hash."""


class KeyFileDamagedError(DataDamagedError):
    """A key file does not match its own checksum (tampered or corrupt)."""


class StorageError(StratavaultError, OSError):
    """A storage backend could not do what was asked."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The backend has no object of that name."""


class ObjectExistsError(StorageError, FileExistsError):
    """The backend refused to overwrite an existing object."""


class PermissionDeniedError(StorageError, PermissionError):
    """The backend or a wrapper (read-only, append-only) refused the operation."""


class ObjectLockedError(PermissionDeniedError):
    """The backend keeps the object under retention (S3 object lock) until ``retain_until``.

    ``retain_until`` is a timezone-aware datetime, or None when the backend did not say.
    """

    def __init__(self, message: str, *, retain_until: datetime.datetime | None = None) -> None:
        super().__init__(message)
        self.retain_until = retain_until


class TransientStorageError(StorageError):
    """A failure that may go away when the operation is retried."""


class StorageFullError(StorageError):
    """The backend has no space left; nothing partial was left behind."""

    exit_code = 14


class SourceError(StratavaultError):
    """Reading what is to be backed up failed as a whole (not a single file)."""


class NbdError(StratavaultError, OSError):
    """An NBD peer could not be reached, refused a request, failed it, or went silent."""

    exit_code = 15


class NbdProtocolError(NbdError):
    """An NBD peer sent bytes that break the protocol (bad magic, truncated, out of order)."""


class IncompleteSnapshotError(StratavaultError):
    """The snapshot was saved, but some files could not be read; they are listed in it."""

    exit_code = 4


class VerificationFailedError(StratavaultError):
    """A restore test (``verify --boot``) ran, and the restored VM showed no sign of life."""

    exit_code = 16


class RestoreError(StratavaultError):
    """Restore could not write something to the target."""


class UnsafePathError(RestoreError):
    """A name in a snapshot would make restore write outside the target."""


class Interrupted(StratavaultError):
    """The operation was cancelled (Ctrl-C); the repository is consistent."""

    exit_code = 130


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "fatal error",
    2: "usage error (bad option or argument)",
    3: "wrong passphrase, or no passphrase given",
    4: "snapshot saved but incomplete: some files could not be read",
    10: "repository does not exist",
    11: "repository is locked by another process",
    12: "data damaged: corrupt, truncated or missing objects",
    13: "unsupported repository format version",
    14: "backend full: no space left",
    15: "NBD peer failed, refused the request or broke the protocol",
    16: "verify --boot: the restored VM showed no sign of life in time",
    130: "interrupted (Ctrl-C); the repository is consistent",
    141: "output closed by its reader (`stratavault ls | head`); nothing is printed",
}
"""Exit codes of the ``stratavault`` command, documented in the README."""
