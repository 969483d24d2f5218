"""Immutable repositories (``init --immutable-days``) on a real S3 server (SeaweedFS) with
object lock: retention on what is written, forget refused while it lasts, prune keeping
(and reporting) the packs it may not delete yet, and the repository still whole."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest

from stratavault.errors import ObjectLockedError
from stratavault.jobs import BackupFilesOptions, backup_files, prune
from stratavault.repo import KdfParams, Repository
from stratavault.storage import S3Storage
from tests.e2e.conftest import Cli
from tests.e2e.fstree import describe
from tests.s3server import S3Server, secret

pytestmark = pytest.mark.infra("s3")
PASSPHRASE = b"correct horse battery staple"


def _use_s3(cli: Cli, server: S3Server, bucket: str, identity: str = "admin") -> str:
    location = f"s3:{server.endpoint}/{bucket}/repo"
    cli.env["STRATAVAULT_REPOSITORY"] = location
    cli.env["AWS_ACCESS_KEY_ID"] = identity
    cli.env["AWS_SECRET_ACCESS_KEY"] = secret(identity)
    return location


def test_immutable_days_refused_for_a_local_folder(cli: Cli) -> None:
    result = cli("init", "--immutable-days", "7")
    assert result.code == 2
    assert "only an S3 bucket with object lock" in result.err
    assert not (cli.repo / "config").exists()


def test_immutable_days_needs_a_bucket_with_object_lock(cli: Cli, s3_server: S3Server) -> None:
    _use_s3(cli, s3_server, s3_server.new_bucket())
    result = cli("init", "--immutable-days", "7")
    assert result.code == 1
    assert "is object lock enabled on bucket" in result.err


def test_immutable_repository_retains_objects_and_refuses_forget(
    cli: Cli, s3_server: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(200_000))
    bucket = s3_server.new_bucket(object_lock=True)
    _use_s3(cli, s3_server, bucket)
    assert (result := cli("init", "--immutable-days", "2", "--json")).code == 0, result.err
    assert result.json_lines()[-1]["immutable_days"] == 2
    assert (result := cli("backup", "files", src, "-q")).code == 0, result.err
    admin = s3_server.client()
    config = json.loads(admin.get_object(Bucket=bucket, Key="repo/config")["Body"].read())
    assert config["immutable_days"] == 2
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    for prefix, retained in [("data/", True), ("snapshots/", True), ("keys/", True),
                             ("config", True), ("index/", False)]:  # fmt: skip
        keys = [o["Key"] for o in admin.list_objects_v2(Bucket=bucket, Prefix=f"repo/{prefix}")
                ["Contents"]]  # fmt: skip
        for key in keys:
            until = admin.head_object(Bucket=bucket, Key=key).get("ObjectLockRetainUntilDate")
            if retained:  # written by the later commands too: the config's retention applies
                assert until is not None and abs(until - soon) < dt.timedelta(minutes=2), key
            else:
                assert until is None, key
    refused = cli("forget", "latest")
    assert refused.code == 1 and "object lock retention until" in refused.err, refused.err
    assert len(cli("snapshots", "--json").json()) == 1  # type: ignore[arg-type]


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_prune_keeps_locked_packs_and_says_until_when(
    cli: Cli, s3_server: S3Server, tmp_path: Path
) -> None:
    """Objects written "a day ago" lose their retention in seconds: the storage's clock
    (retention from each write) and the repository's (prune extends the retention of what
    is in use from its "now") are set back. The pack a first prune writes when it repacks is
    retained a little longer than the snapshot that uses it; once that snapshot is
    forgotten, prune keeps the pack and names the date, a second prune still does, and a
    prune after the date deletes it. The repository stays whole throughout."""
    bucket = s3_server.new_bucket(object_lock=True)
    _use_s3(cli, s3_server, bucket)
    written = [dt.timedelta(days=-1, seconds=4)]
    now = [written[0]]
    storage = S3Storage(
        bucket, "repo", **s3_server.credentials(),
        clock=lambda: dt.datetime.now(dt.UTC) + written[0],
    )  # fmt: skip
    a, b, d = os.urandom(400_000), os.urandom(400_000), os.urandom(300_000)
    src, keep = tmp_path / "src", tmp_path / "keep"
    cache = tmp_path / "cache"
    with Repository.init(
        storage, PASSPHRASE, cache_dir=cache, kdf=KdfParams.fast(), immutable_days=1,
        clock=lambda: time.time() + now[0].total_seconds(),
    ) as repo:  # fmt: skip
        old1 = backup_files(repo, BackupFilesOptions(paths=(_write(src, {"a": a, "b": b}),)))
        old2 = backup_files(repo, BackupFilesOptions(paths=(_write(src, {"a": a}),)))
        written_by = time.monotonic()  # old1 and old2 are retained until 4 s after it at most
        written[0] = now[0] = dt.timedelta(0)  # from now on, a day of retention
        kept = backup_files(repo, BackupFilesOptions(paths=(_write(keep, {"d": d}),)))
        with pytest.raises(ObjectLockedError):
            repo.remove_snapshot(kept.id)
        time.sleep(max(0.0, written_by + 5 - time.monotonic()))
        repo.remove_snapshot(old1.id)  # its retention is over
        written[0], now[0] = dt.timedelta(days=-1, seconds=16), dt.timedelta(days=-1, seconds=7)
        first = prune(repo, max_unused=0.0)  # repacks `a` into a pack retained for 16 s
        assert first.deleted_packs >= 2 and not first.locked_packs
        assert first.retention_extended >= 3  # old2 and what it uses: 7 s
        pruned_by = time.monotonic()
        time.sleep(8)
        repo.remove_snapshot(old2.id)  # its 7 s are over; the repacked pack keeps 8 more
    unlocked_at = pruned_by + 16

    report = cli("prune", "--json")
    assert report.code == 0, report.err
    doc = report.json_lines()[-1]
    locked = doc["locked_packs"]
    assert len(locked) == 1, doc
    until = dt.datetime.fromisoformat(locked[0]["retain_until"])
    assert abs(until - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=30)
    text = cli("prune")
    assert text.code == 0 and "could not delete 1 unused packs yet" in text.out, text.out
    assert f"until {until:%Y-%m-%d %H:%M} UTC" in text.out
    names = {o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=bucket, Prefix="repo/data/")["Contents"]}  # fmt: skip
    assert f"repo/{locked[0]['pack']}" in names  # still there, for a prune after the date

    assert (check := cli("check", "--read-data")).code == 0, check.out + check.err
    snaps = cli("snapshots", "--json").json()
    assert isinstance(snaps, list) and [s["id"] for s in snaps] == [kept.id]
    out = tmp_path / "out"
    assert (result := cli("restore", kept.id, "--target", out, "--verify")).code == 0, result.err
    assert describe(out / keep.relative_to("/")) == describe(keep)

    time.sleep(max(0.0, unlocked_at - time.monotonic()) + 1)
    after = cli("prune", "--json")
    assert after.code == 0, after.err
    doc = after.json_lines()[-1]
    assert doc["locked_packs"] == [] and doc["deleted_packs"] == 1, doc
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="repo/")["Contents"]
    keys = {o["Key"] for o in listing}
    assert f"repo/{locked[0]['pack']}" not in keys
    assert not [k for k in keys if k.startswith("repo/gc/")]  # the plan is done
    assert (check := cli("check", "--read-data")).code == 0, check.out + check.err


def test_prune_extends_the_retention_of_what_is_in_use(
    cli: Cli, s3_server: S3Server, tmp_path: Path
) -> None:
    """Retention counts from each write: prune extends it for the objects still in use,
    so that the first backup's packs stay protected as long as later snapshots use them."""
    bucket = s3_server.new_bucket(object_lock=True)
    _use_s3(cli, s3_server, bucket)
    storage = S3Storage(
        bucket, "repo", **s3_server.credentials(),
        clock=lambda: dt.datetime.now(dt.UTC) - dt.timedelta(days=1, seconds=-120),
    )  # fmt: skip
    src = _write(tmp_path / "src", {"a": os.urandom(300_000)})
    with Repository.init(
        storage, PASSPHRASE, cache_dir=tmp_path / "cache", kdf=KdfParams.fast(), immutable_days=1
    ) as repo:
        backup_files(repo, BackupFilesOptions(paths=(src,)))
    admin = s3_server.client()
    objects = [o["Key"] for o in admin.list_objects_v2(Bucket=bucket, Prefix="repo/")["Contents"]]
    kept = [k for k in objects if not k.startswith(("repo/index/", "repo/locks/"))]
    assert len(kept) >= 5  # config, key, data and tree packs, snapshot

    def retained(key: str) -> dt.timedelta:
        until = admin.head_object(Bucket=bucket, Key=key)["ObjectLockRetainUntilDate"]
        return until - dt.datetime.now(dt.UTC)

    assert all(retained(k) < dt.timedelta(minutes=3) for k in kept)  # written "a day ago"
    result = cli("prune", "--json")
    assert result.code == 0, result.err
    assert result.json_lines()[-1]["retention_extended"] == len(kept)
    assert all(retained(k) > dt.timedelta(hours=23) for k in kept)
    again = cli("prune")  # nothing to shorten, nothing lost: a second prune extends again
    assert again.code == 0 and f"retention of {len(kept)} objects in use extended" in again.out
