"""What every command needs: global options, the passphrase, an open repository."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stratavault._defaults import default_cache_dir
from stratavault.errors import NoPassphraseError, PassphraseError, UsageError

if TYPE_CHECKING:  # imported where used: a command that needs no repository does not load them
    from stratavault.repo import DerivedKeys, KdfParams, Repository
    from stratavault.storage import Storage

__all__ = [
    "GlobalOptions",
    "open_repo",
    "read_new_passphrase",
    "read_passphrase",
    "storage_for",
]

ENV_REPOSITORY = "STRATAVAULT_REPOSITORY"
ENV_PASSWORD_FILE = "STRATAVAULT_PASSWORD_FILE"
ENV_PASSWORD_COMMAND = "STRATAVAULT_PASSWORD_COMMAND"
ENV_CACHE_DIR = "STRATAVAULT_CACHE_DIR"
ENV_FAST_KDF = "STRATAVAULT_INSECURE_FAST_KDF"


@dataclass(frozen=True, slots=True)
class GlobalOptions:
    """Options shared by every command."""

    repository: str | None = None
    password_file: Path | None = None
    password_command: str | None = None
    cache_dir: Path | None = None
    no_cache: bool = False
    json: bool = False
    quiet: bool = False
    limit_upload_kib: int | None = None
    limit_download_kib: int | None = None
    derived_keys: DerivedKeys | None = field(default=None, compare=False, repr=False)
    """Key derivations remembered by the host agent running this command (else None)."""

    @property
    def repository_location(self) -> str:
        """The repository to use; ``UsageError`` when none is given."""
        location = self.repository or os.environ.get(ENV_REPOSITORY)
        if not location:
            raise UsageError(f"no repository given: use -r/--repo or set {ENV_REPOSITORY}")
        return location

    @property
    def effective_cache_dir(self) -> Path | None:
        """Where the local caches live, or ``None`` when disabled, or when there is no home
        folder to find them in (no ``HOME``, no entry in the user database)."""
        if self.no_cache:
            return None
        if self.cache_dir:
            return self.cache_dir
        env = os.environ.get(ENV_CACHE_DIR)
        if env:
            return Path(env)
        try:
            return default_cache_dir()
        except RuntimeError:  # Path.home() found none
            return None


def path_arg(text: str) -> Path:
    """An argparse ``type`` for paths: an empty one is a usage error (``Path("")`` would be
    the current folder, so ``--target ""`` restored into it)."""
    if not text:
        import argparse

        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def _from_command(command: str) -> bytes:
    import subprocess

    from stratavault._process import kill_process_tree

    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, _err = proc.communicate()
    except BaseException:  # Ctrl-C, SIGTERM: the command and what it started end too
        kill_process_tree(proc.pid)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise NoPassphraseError(
            f"password command {command!r} failed with exit code {proc.returncode}"
        )
    return out.rstrip(b"\r\n")


def _from_file(path: Path) -> bytes:
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise NoPassphraseError(f"reading password file {path}: {exc.strerror}") from exc


def read_passphrase(options: GlobalOptions, *, prompt: str = "repository passphrase: ") -> bytes:
    """The passphrase from option, environment or terminal; never from the command line."""
    if options.password_file:
        return _from_file(options.password_file)
    if options.password_command:
        return _from_command(options.password_command)
    if env_file := os.environ.get(ENV_PASSWORD_FILE):
        return _from_file(Path(env_file))
    if env_cmd := os.environ.get(ENV_PASSWORD_COMMAND):
        return _from_command(env_cmd)
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt).encode()
    raise NoPassphraseError(
        f"no passphrase: use --password-file, --password-command, {ENV_PASSWORD_FILE} "
        f"or {ENV_PASSWORD_COMMAND}, or run on a terminal"
    )


def _has_passphrase_source(options: GlobalOptions) -> bool:
    return bool(
        options.password_file
        or options.password_command
        or os.environ.get(ENV_PASSWORD_FILE)
        or os.environ.get(ENV_PASSWORD_COMMAND)
    )


def read_new_passphrase(
    new_password_file: Path | None, options: GlobalOptions, *, may_reuse_current: bool
) -> bytes:
    """A new passphrase: from ``--new-password-file``, else asked twice on a terminal.

    ``init`` (``may_reuse_current``) also takes it from the usual passphrase sources;
    ``key add``/``key passwd`` refuse to, since that would set the same passphrase again.
    """
    if new_password_file:
        secret = _from_file(new_password_file)
    elif may_reuse_current and _has_passphrase_source(options):
        secret = read_passphrase(options)
    elif sys.stdin.isatty():
        import getpass

        secret = getpass.getpass("new passphrase: ").encode()
        if getpass.getpass("repeat new passphrase: ").encode() != secret:
            raise PassphraseError("the two passphrases differ")
    else:
        raise UsageError("no new passphrase: use --new-password-file or run on a terminal")
    if not secret:
        raise UsageError("an empty passphrase is not allowed")
    return secret


def kdf_params() -> KdfParams | None:
    """Cheap key derivation for tests only (``STRATAVAULT_INSECURE_FAST_KDF=1``)."""
    if os.environ.get(ENV_FAST_KDF) != "1":
        return None
    from stratavault.repo import KdfParams

    return KdfParams.fast()


def storage_for(
    options: GlobalOptions, *, location: str | None = None, object_cache: bool = True
) -> Storage:
    """The backend of the repository (or of ``location``), with the bandwidth limits applied.

    A remote backend keeps its local copies of metadata objects under the cache folder
    (``--cache-dir``; none with ``--no-cache``); ``object_cache=False`` reads every object
    from the backend itself (``check`` authenticates what the backend holds).
    """
    from stratavault.storage import RateLimitedStorage, open_storage

    cache: Path | bool | None = options.effective_cache_dir if object_cache else None
    storage = open_storage(location or options.repository_location, cache_dir=cache)
    if options.limit_upload_kib or options.limit_download_kib:
        storage = RateLimitedStorage(
            storage,
            upload_bytes_per_s=(options.limit_upload_kib or 0) * 1024 or None,
            download_bytes_per_s=(options.limit_download_kib or 0) * 1024 or None,
        )
    return storage


_PRELOAD_AFTER_S = 0.005
"""The preloading thread lets the caller enter the key derivation first: numpy's
initialisation in C holds the GIL for tens of milliseconds at a time, which would hold
back a derivation that has not yet released it."""


@contextmanager
def open_repo(
    options: GlobalOptions, *, object_cache: bool = True, preload: Sequence[str] = ()
) -> Iterator[Repository]:
    """Open the repository named by the options with the user's passphrase
    (``object_cache``: see :func:`storage_for`).

    The key is derived before the repository layer's heavy modules (numpy, the chunk
    index) are loaded, so the key derivation's memory and theirs do not add up: a command
    should open the repository before it imports the jobs that use it. A command whose
    peak comes later anyway (the disk commands) names its modules in ``preload``: a
    thread imports them while the key is derived (Argon2id runs without the GIL), which
    takes ~0.15 s off its start from a cold page cache.
    """
    from stratavault.repo import unlock_repository

    storage = storage_for(options, object_cache=object_cache)
    try:
        unlocked = unlock_repository(
            storage,
            read_passphrase(options),
            before_derive=(lambda: _import_in_background(preload, after_s=_PRELOAD_AFTER_S))
            if preload
            else None,
            derived=options.derived_keys,
        )
        from stratavault.repo import Repository

        repo = Repository.unlocked(storage, unlocked, cache_dir=options.effective_cache_dir)
        with repo:
            yield repo
    finally:
        storage.close()


def _import_in_background(modules: Sequence[str], *, after_s: float = 0.0) -> threading.Thread:
    """Import ``modules`` in order in a daemon thread (returned), starting ``after_s``
    seconds from now; one that fails to import stops the rest and is left for the
    command's own import to report."""

    def run() -> None:
        time.sleep(after_s)
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:
                return

    thread = threading.Thread(target=run, name="preload", daemon=True)
    thread.start()
    return thread
