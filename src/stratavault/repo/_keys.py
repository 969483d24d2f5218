"""Key slots: master key material wrapped by passphrase-derived keys (``keys/<id>``)."""

from __future__ import annotations

import base64
import datetime as dt
import getpass
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stratavault.errors import KeyFileDamagedError, UnsupportedFormatError
from stratavault.repo import _formats as F
from stratavault.repo._crypto import (
    AuthenticationFailed,
    DerivedKeys,
    KdfParams,
    MasterKeys,
    seal,
    unseal,
)

__all__ = ["KeyInfo", "KeySlot", "make_key_file", "parse_key_file"]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key slot as listed by ``Repository.list_keys``."""

    id: str
    created: str
    host: str
    user: str
    current: bool


@dataclass(frozen=True, slots=True)
class KeySlot:
    """A parsed (checksum-verified, still wrapped) key file."""

    name: str
    body: dict[str, Any]
    kdf: KdfParams
    salt: bytes
    wrapped: bytes

    def info(self, *, current: bool) -> KeyInfo:
        """The public description of this slot."""
        return KeyInfo(
            id=self.name.removeprefix(F.KEYS_PREFIX),
            created=str(self.body.get("created", "")),
            host=str(self.body.get("host", "")),
            user=str(self.body.get("user", "")),
            current=current,
        )

    def unwrap(
        self, passphrase: bytes, repo_id: str, derived: DerivedKeys | None = None
    ) -> MasterKeys | None:
        """Return the master keys, or None if ``passphrase`` does not open this slot
        (``derived``: derivations remembered, and where to remember this one)."""
        key = derived.get(self.kdf, self.salt, passphrase) if derived is not None else None
        fresh = key is None
        if key is None:
            key = self.kdf.derive(passphrase, self.salt)
        try:
            material = unseal(AESGCM(key), self.wrapped, F.AD_KEY + repo_id.encode())
        except AuthenticationFailed:
            return None
        if fresh and derived is not None:
            derived.put(self.kdf, self.salt, passphrase, key)
        return MasterKeys(material)


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return blake3.blake3(canonical).hexdigest()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def make_key_file(
    keys: MasterKeys, passphrase: bytes, repo_id: str, kdf: KdfParams, *, now: float
) -> bytes:
    """Serialize a new key slot wrapping ``keys`` with ``passphrase``."""
    salt = os.urandom(F.SALT_BYTES)
    wrapping = AESGCM(kdf.derive(passphrase, salt))
    wrapped = seal(wrapping, keys.material, F.AD_KEY + repo_id.encode())
    body: dict[str, Any] = {
        "version": F.KEY_FILE_VERSION,
        "kdf": {**kdf.to_json(), "salt": base64.b64encode(salt).decode()},
        "created": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "user": _user(),
        "data": base64.b64encode(wrapped).decode(),
    }
    document = {"body": body, "checksum": _checksum(body)}
    return json.dumps(document, indent=1).encode()


def parse_key_file(name: str, raw: bytes) -> KeySlot:
    """Parse and checksum-verify a key file; KeyFileDamagedError if damaged."""
    try:
        document = json.loads(raw)
        body = document["body"]
        if not isinstance(body, dict) or document["checksum"] != _checksum(body):
            raise ValueError("checksum mismatch")
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileDamagedError(f"reading key file {name} - damaged or tampered: {exc}") from exc
    if body.get("version") != F.KEY_FILE_VERSION:
        raise UnsupportedFormatError(
            f"reading key file {name} - unsupported key file version {body.get('version')!r}"
        )
    try:
        params = body["kdf"]
        if params["algorithm"] != F.KDF_ALGORITHM:
            raise ValueError(f"unknown key derivation {params['algorithm']!r}")
        kdf = KdfParams(
            time_cost=int(params["time_cost"]),
            memory_kib=int(params["memory_kib"]),
            parallelism=int(params["parallelism"]),
        )
        salt = base64.b64decode(params["salt"], validate=True)
        wrapped = base64.b64decode(body["data"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileDamagedError(f"reading key file {name} - malformed: {exc}") from exc
    return KeySlot(name=name, body=body, kdf=kdf, salt=salt, wrapped=wrapped)
