"""What a command needs before the rest of the repository layer loads: where the local
cache lives (:func:`~stratavault._defaults.default_cache_dir`), and the config and master
keys (unlocking a key slot, or creating them).

This module imports nothing heavy (no numpy, no chunk index), so that a command can derive
the passphrase's key (Argon2id's 32 MiB, or scrypt's) while the process is still small and
load the rest afterwards: the two peaks do not add up.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stratavault._defaults import default_cache_dir
from stratavault.errors import ObjectExistsError, ObjectNotFoundError, RepositoryExistsError
from stratavault.repo import _formats as F, _immutable, _keyring
from stratavault.repo._config import new_config, read_config
from stratavault.repo._crypto import DerivedKeys, KdfParams, MasterKeys
from stratavault.storage import Storage

__all__ = ["Unlocked", "create_repository", "default_cache_dir", "unlock_repository"]


@dataclass(frozen=True, slots=True)
class Unlocked:
    """A repository's config and master keys, and the key slot that opened them."""

    config: dict[str, Any]
    keys: MasterKeys
    key_name: str


def unlock_repository(
    storage: Storage,
    passphrase: bytes,
    *,
    before_derive: Callable[[], object] | None = None,
    derived: DerivedKeys | None = None,
) -> Unlocked:
    """Read the config (applying its object-lock settings to ``storage``) and unlock a key
    slot with ``passphrase`` (``PassphraseError`` when none opens). ``before_derive`` is
    called once the key slots are read, just before the key derivation (~0.1 s of native
    code without the GIL): a caller can start other work to run meanwhile. ``derived``:
    key derivations remembered from earlier commands (the host agent's)."""
    config = read_config(storage)
    _immutable.apply(storage, _immutable.days(config, storage), creating=False)
    keys, key_name = _keyring.unlock(storage, passphrase, config["id"], before_derive, derived)
    return Unlocked(config, keys, key_name)


def create_repository(
    storage: Storage,
    passphrase: bytes,
    *,
    now: float,
    kdf: KdfParams | None,
    immutable_days: int | None,
    shared: tuple[dict[str, Any], MasterKeys] | None,
) -> Unlocked:
    """Write a new repository's first key slot and then its config (see
    :meth:`Repository.init`); ``shared``: the config and keys of a repository whose
    chunk-id key and chunker parameters the new one takes. ``RepositoryExistsError`` when
    ``storage`` holds a config already."""
    _immutable.apply(storage, immutable_days, creating=True)
    try:
        storage.stat(F.CONFIG_NAME)
    except ObjectNotFoundError:
        pass
    else:
        raise RepositoryExistsError(
            f"creating repository at {storage.properties.location} - a config already exists"
        )
    config = new_config(now, immutable_days)
    keys = MasterKeys.generate()
    if shared is not None:
        config["chunker"] = shared[0]["chunker"]
        keys = MasterKeys(keys.material[: F.KEY_BYTES] + shared[1].material[F.KEY_BYTES :])
    key_name = _keyring.write_slot(storage, keys, passphrase, config["id"], kdf, now)
    try:
        storage.put(F.CONFIG_NAME, json.dumps(config, indent=1).encode())
    except ObjectExistsError as exc:
        raise RepositoryExistsError(
            f"creating repository at {storage.properties.location} - created concurrently"
        ) from exc
    return Unlocked(config, keys, key_name)
