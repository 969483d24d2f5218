"""What a command needs before the rest of the repository layer loads: where the local
cache lives, and the config and master keys (unlocking a key slot).

This module imports nothing heavy (no numpy, no chunk index), so that a command can derive
the passphrase's key (Argon2id's 32 MiB, or scrypt's) while the process is still small and
load the rest afterwards: the two peaks do not add up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratavault.repo import _immutable, _keyring
from stratavault.repo._config import read_config
from stratavault.repo._crypto import MasterKeys
from stratavault.storage import Storage

__all__ = ["Unlocked", "default_cache_dir", "unlock_repository"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stratavault`` or ``~/.cache/stratavault``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stratavault"


@dataclass(frozen=True, slots=True)
class Unlocked:
    """A repository's config and master keys, and the key slot that opened them."""

    config: dict[str, Any]
    keys: MasterKeys
    key_name: str


def unlock_repository(storage: Storage, passphrase: bytes) -> Unlocked:
    """Read the config (applying its object-lock settings to ``storage``) and unlock a key
    slot with ``passphrase`` (``PassphraseError`` when none opens)."""
    config = read_config(storage)
    _immutable.apply(storage, _immutable.days(config, storage), creating=False)
    keys, key_name = _keyring.unlock(storage, passphrase, config["id"])
    return Unlocked(config, keys, key_name)
