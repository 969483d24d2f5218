from __future__ import annotations

import json

import pytest

from stratavault.errors import (
    KeyFileDamagedError,
    PassphraseError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    UnsupportedFormatError,
    UsageError,
)
from stratavault.repo import KdfParams, Repository
from stratavault.storage import MemoryStorage

from .conftest import PASS


def key_names(storage: MemoryStorage) -> list[str]:
    return sorted(o.name for o in storage.list("keys/"))


def test_open_with_right_passphrase_reads_chunks(repo: Repository, storage: MemoryStorage) -> None:
    cid = repo.chunk_id(b"hello")
    repo.add_chunk(cid, b"hello")
    repo.close()
    with Repository.open(storage, PASS, cache_dir=None) as again:
        assert again.id == repo.id
        assert again.read_chunk(cid) == b"hello"


def test_wrong_passphrase(repo: Repository, storage: MemoryStorage) -> None:
    with pytest.raises(PassphraseError) as err:
        Repository.open(storage, b"wrong", cache_dir=None)
    assert err.value.exit_code == 3
    assert not isinstance(err.value, KeyFileDamagedError)


@pytest.mark.parametrize("where", ["data", "checksum", "json"])
def test_tampered_key_file_is_not_a_wrong_passphrase(
    repo: Repository, storage: MemoryStorage, where: str
) -> None:
    (name,) = key_names(storage)
    raw = storage.get(name)
    if where == "json":
        damaged = raw[: len(raw) // 2]
    else:
        doc = json.loads(raw)
        if where == "data":
            data = doc["body"]["data"]
            doc["body"]["data"] = ("B" if data[0] != "B" else "C") + data[1:]
        else:
            doc["checksum"] = "0" * 64
        damaged = json.dumps(doc).encode()
    storage.put(name, damaged, overwrite=True)
    with pytest.raises(KeyFileDamagedError) as err:
        Repository.open(storage, PASS, cache_dir=None)
    assert err.value.exit_code == 12
    assert name in str(err.value)


def test_missing_repository(storage: MemoryStorage) -> None:
    with pytest.raises(RepositoryNotFoundError) as err:
        Repository.open(storage, PASS, cache_dir=None)
    assert err.value.exit_code == 10


def test_newer_format_version_refused(repo: Repository, storage: MemoryStorage) -> None:
    config = json.loads(storage.get("config"))
    config["version"] = 99
    storage.put("config", json.dumps(config).encode(), overwrite=True)
    with pytest.raises(UnsupportedFormatError, match="99"):
        Repository.open(storage, PASS, cache_dir=None)


def test_init_twice_refused(repo: Repository, storage: MemoryStorage) -> None:
    with pytest.raises(RepositoryExistsError):
        Repository.init(storage, PASS, cache_dir=None, kdf=KdfParams.fast())


def test_config_is_public_and_everything_else_is_not(
    repo: Repository, storage: MemoryStorage
) -> None:
    config = json.loads(storage.get("config"))
    assert config["id"] == repo.id and config["version"] == 1
    cid = repo.chunk_id(b"secret words " * 100)
    repo.add_chunk(cid, b"secret words " * 100, level=1)
    repo.save_snapshot({"hostname": "secret-host"})
    for obj in storage.list():
        if obj.name != "config":
            assert b"secret" not in storage.get(obj.name)


def test_add_list_remove_keys(repo: Repository, storage: MemoryStorage) -> None:
    second = repo.add_key(b"second", kdf=KdfParams.fast())
    keys = repo.list_keys()
    assert len(keys) == 2
    assert [k.current for k in keys if k.id == second] == [False]
    assert sum(k.current for k in keys) == 1
    with Repository.open(storage, b"second", cache_dir=None) as other:
        assert other.id == repo.id
        assert [k.id for k in other.list_keys() if k.current] == [second]
        current = next(k.id for k in repo.list_keys() if k.current)
        other.remove_key(current)
        with pytest.raises(UsageError, match="in use"):
            other.remove_key(second)
        with pytest.raises(UsageError, match="no such"):
            other.remove_key("ffff")
    with pytest.raises(PassphraseError):
        Repository.open(storage, PASS, cache_dir=None)


def test_remove_last_key_refused(repo: Repository, storage: MemoryStorage) -> None:
    (name,) = key_names(storage)
    other = repo.add_key(b"other", kdf=KdfParams.fast())
    with Repository.open(storage, b"other", cache_dir=None) as second:
        second.remove_key(name.removeprefix("keys/"))
        storage.put("keys/" + "0" * 32, storage.get("keys/" + other))  # only for the count
        storage.delete("keys/" + "0" * 32)
        with pytest.raises(UsageError):
            second.remove_key(other)


def test_change_passphrase_rewrites_only_the_key_file(
    repo: Repository, storage: MemoryStorage
) -> None:
    cid = repo.chunk_id(b"data")
    repo.add_chunk(cid, b"data")
    repo.flush()
    before = {o.name: storage.get(o.name) for o in storage.list() if not o.name.startswith("keys/")}
    old_keys = key_names(storage)
    new_id = repo.change_passphrase(b"new passphrase", kdf=KdfParams.fast())
    after = {o.name: storage.get(o.name) for o in storage.list() if not o.name.startswith("keys/")}
    assert before == after
    assert key_names(storage) == [f"keys/{new_id}"] and old_keys != key_names(storage)
    with pytest.raises(PassphraseError):
        Repository.open(storage, PASS, cache_dir=None)
    with Repository.open(storage, b"new passphrase", cache_dir=None) as again:
        assert again.read_chunk(cid) == b"data"


def test_kdf_parameters_are_stored_per_slot(repo: Repository, storage: MemoryStorage) -> None:
    repo.add_key(b"x", kdf=KdfParams(time_cost=2, memory_kib=16, parallelism=1))
    kdfs = sorted(
        json.loads(storage.get(n))["body"]["kdf"]["time_cost"] for n in key_names(storage)
    )
    assert kdfs == [1, 2]


@pytest.mark.parametrize(
    ("params", "passphrase", "salt", "expected"),
    [
        (KdfParams(time_cost=1, memory_kib=8, parallelism=1), b"x", b"s" * 16,
         "dd6886e62d99ccc714d29d5c414a963be72e45ad130e4e91def770280af68973"),
        (KdfParams(time_cost=2, memory_kib=64, parallelism=2), b"correct horse",
         b"0123456789abcdef", "7a1a864655e1358f74bb5997a24b9a1a9a2bf4e686e1649955be2309f7afe32b"),
    ],
)  # fmt: skip
def test_key_derivation_is_rfc_9106_argon2id(
    params: KdfParams, passphrase: bytes, salt: bytes, expected: str
) -> None:
    """Known answers (computed with argon2-cffi, which derived the keys of slots made
    before 2026-12-07): every existing key slot still opens."""
    assert params.derive(passphrase, salt).hex() == expected
