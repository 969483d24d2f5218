"""Key slots on the backend: write, unlock, list and remove ``keys/<id>``."""

from __future__ import annotations

import os
from collections.abc import Callable

from stratavault.errors import (
    KeyFileDamagedError,
    ObjectNotFoundError,
    PassphraseError,
    UsageError,
)
from stratavault.repo import _formats as F
from stratavault.repo._crypto import DerivedKeys, KdfParams, MasterKeys
from stratavault.repo._keys import KeyInfo, KeySlot, make_key_file, parse_key_file
from stratavault.storage import Storage

__all__ = ["list_slots", "remove_slot", "unlock", "write_slot"]


def write_slot(
    storage: Storage,
    keys: MasterKeys,
    passphrase: bytes,
    repo_id: str,
    kdf: KdfParams | None,
    now: float,
) -> str:
    """Store a new key slot; return its object name."""
    name = F.KEYS_PREFIX + os.urandom(16).hex()
    storage.put(name, make_key_file(keys, passphrase, repo_id, kdf or KdfParams(), now=now))
    return name


def _slots(storage: Storage) -> list[KeySlot | KeyFileDamagedError]:
    slots: list[KeySlot | KeyFileDamagedError] = []
    for obj in sorted(storage.list(F.KEYS_PREFIX), key=lambda o: o.name):
        try:
            slots.append(parse_key_file(obj.name, storage.get(obj.name)))
        except ObjectNotFoundError:
            continue
        except KeyFileDamagedError as exc:
            slots.append(exc)
    return slots


def unlock(
    storage: Storage,
    passphrase: bytes,
    repo_id: str,
    before_derive: Callable[[], object] | None = None,
    derived: DerivedKeys | None = None,
) -> tuple[MasterKeys, str]:
    """Try every slot; return the master keys and the name of the slot that opened
    (``before_derive``: called once, after the slots are read, before the first key
    derivation; ``derived``: see :meth:`KeySlot.unwrap`).

    PassphraseError when every slot is intact and none opens; KeyFileDamagedError
    when none opens and some slot is damaged (it may have been the right one).
    """
    slots = _slots(storage)
    if before_derive is not None:
        before_derive()
    damaged = [s for s in slots if isinstance(s, KeyFileDamagedError)]
    for slot in slots:
        if isinstance(slot, KeySlot):
            keys = slot.unwrap(passphrase, repo_id, derived)
            if keys is not None:
                return keys, slot.name
    where = storage.properties.location
    if damaged:
        raise KeyFileDamagedError(
            f"opening repository at {where} - no intact key slot opens with this passphrase; "
            + "; ".join(str(d) for d in damaged)
        ) from damaged[0]
    if not slots:
        raise KeyFileDamagedError(f"opening repository at {where} - no key slots in keys/")
    raise PassphraseError(
        f"opening repository at {where} - wrong passphrase: none of {len(slots)} key slots "
        "opens (they are bound to the config's id: a changed config would look the same)"
    )


def list_slots(storage: Storage, current: str) -> list[KeyInfo]:
    """The intact key slots (damaged ones are left out)."""
    return [s.info(current=s.name == current) for s in _slots(storage) if isinstance(s, KeySlot)]


def remove_slot(storage: Storage, key_id: str, current: str) -> None:
    """Delete slot ``key_id``; refuse the slot in use and the last slot."""
    name = F.KEYS_PREFIX + key_id
    if name == current:
        raise UsageError(f"removing key {key_id} - it is the key in use; open with another first")
    names = {o.name for o in storage.list(F.KEYS_PREFIX)}
    if name not in names:
        raise UsageError(f"removing key {key_id} - no such key slot")
    if len(names) <= 1:
        raise UsageError(f"removing key {key_id} - it is the last key slot")
    storage.delete(name)
