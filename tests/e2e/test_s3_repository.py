"""End to end on a real S3 server (SeaweedFS): the command line on an s3: repository, an
appending identity that backs up without delete rights, and a backup through 5 % faults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stratavault.jobs import (
    BackupFilesOptions,
    RestoreOptions,
    backup_files,
    check_repository,
    restore_files,
)
from stratavault.repo import KdfParams, Repository
from stratavault.storage import FaultyStorage, RetryingStorage, S3Storage
from tests.e2e.conftest import Cli
from tests.e2e.fstree import build_sample_tree, describe
from tests.s3server import S3Server, secret

pytestmark = pytest.mark.infra("s3")
PASSPHRASE = b"correct horse battery staple"


def _use_s3(cli: Cli, server: S3Server, bucket: str, identity: str = "admin") -> str:
    location = f"s3:{server.endpoint}/{bucket}/repo"
    cli.env["STRATAVAULT_REPOSITORY"] = location
    cli.env["AWS_ACCESS_KEY_ID"] = identity
    cli.env["AWS_SECRET_ACCESS_KEY"] = secret(identity)
    return location


def test_cli_init_backup_restore_check_on_s3(cli: Cli, s3_server: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_sample_tree(src)
    _use_s3(cli, s3_server, s3_server.new_bucket())
    assert (result := cli("init")).code == 0, result.err
    first = cli("backup", "files", src, "--json")
    assert first.code == 0, first.err
    (src / "docs" / "a.txt").write_text("changed\n")
    (src / "added.bin").write_bytes(os.urandom(300_000))
    second = cli("backup", "files", src, "--json")
    assert second.code == 0, second.err
    summary = second.json_lines()[-1]
    assert summary["files_new"] == 1 and summary["files_changed"] == 1
    assert summary["bytes_added_stored"] < 400_000  # only what changed went up

    target = tmp_path / "restored"
    assert (result := cli("restore", "latest", "--target", target, "--verify")).code == 0, (
        result.err
    )
    assert describe(target / src.relative_to("/")) == describe(src)
    check = cli("check", "--read-data")
    assert check.code == 0, check.out + check.err
    cached = {p.parent.name for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file()}
    assert {"snapshots", "index", "keys"} <= cached  # metadata kept locally for the next run


def test_cli_append_only_identity_backs_up_but_cannot_delete(
    cli: Cli, s3_server: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(os.urandom(100_000))
    bucket = s3_server.new_bucket(append_only="repo")
    _use_s3(cli, s3_server, bucket, "admin")
    assert cli("init").code == 0
    _use_s3(cli, s3_server, bucket, "appender")
    for _ in range(2):  # it takes and removes its lock each time
        assert (result := cli("backup", "files", src, "-q")).code == 0, result.err
    snaps = cli("snapshots", "--json").json()
    assert isinstance(snaps, list) and len(snaps) == 2
    refused = cli("forget", "--keep-last", "1")
    assert refused.code != 0 and "access denied" in refused.err
    assert len(cli("snapshots", "--json").json()) == 2  # type: ignore[arg-type]
    (src / "file").write_bytes(os.urandom(100_000))  # data only the forgotten ones use now
    assert (result := cli("backup", "files", src, "-q")).code == 0, result.err
    _use_s3(cli, s3_server, bucket, "admin")
    assert cli("forget", "--keep-last", "1").code == 0  # pruning is for other credentials
    assert len(cli("snapshots", "--json").json()) == 1  # type: ignore[arg-type]
    _use_s3(cli, s3_server, bucket, "appender")
    refused = cli("prune")
    assert refused.code != 0 and "access denied" in refused.err, refused.err
    _use_s3(cli, s3_server, bucket, "admin")
    pruned = cli("prune", "--json")
    assert pruned.code == 0, pruned.err
    assert pruned.json_lines()[-1]["deleted_packs"] >= 1
    assert (check := cli("check", "--read-data")).code == 0, check.out + check.err
    _use_s3(cli, s3_server, bucket, "appender")
    assert (result := cli("backup", "files", src, "-q")).code == 0, result.err


def test_backup_through_five_percent_transient_faults(s3_server: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    build_sample_tree(src)
    (src / "more").mkdir()
    for i in range(40):  # ~12 MiB in ~50 packs: a few hundred calls for the faults to hit
        (src / "more" / f"f{i}").write_bytes(os.urandom(300_000))
    bucket = s3_server.new_bucket()
    s3 = S3Storage(bucket, "flaky", **s3_server.credentials())
    faulty = FaultyStorage(s3, seed=11, error_rate=0.05)
    storage = RetryingStorage(faulty, attempts=8, backoff_s=0.01)
    options = {"pack_target_bytes": 256 << 10}  # more packs, more calls to fail
    with Repository.init(
        storage, PASSPHRASE, cache_dir=tmp_path / "cache", kdf=KdfParams.fast(), **options
    ) as repo:
        backup_files(repo, BackupFilesOptions(paths=(src,)))
    (src / "docs" / "a.txt").write_text("second run\n")
    with Repository.open(storage, PASSPHRASE, cache_dir=tmp_path / "cache", **options) as repo:
        snapshot = backup_files(repo, BackupFilesOptions(paths=(src,)))
        result = check_repository(repo, read_data=True)
        assert result.damages == [] and result.chunks_read > 0
        restore_files(repo, snapshot, RestoreOptions(target=tmp_path / "out", verify=True))
    assert faulty.faults >= 8  # the faults did happen, and were ridden out
    assert describe(tmp_path / "out" / src.relative_to("/")) == describe(src)
    storage.close()


def test_cli_cache_options_reach_the_object_cache_and_check_reads_the_bucket(
    cli: Cli, s3_server: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(os.urandom(50_000))
    bucket = s3_server.new_bucket()
    _use_s3(cli, s3_server, bucket)
    mine = tmp_path / "my-cache"
    assert cli("--cache-dir", mine, "init").code == 0
    assert cli("--cache-dir", mine, "backup", "files", src, "-q").code == 0
    assert {p.parent.name for p in (mine / "objects").rglob("*") if p.is_file()} >= {
        "snapshots", "index", "keys"
    }  # fmt: skip
    nothing = tmp_path / "unused-cache"
    assert cli("--no-cache", "--cache-dir", nothing, "snapshots", "-q").code == 0
    assert not nothing.exists()

    # damage the snapshot in the bucket (same size): the cached copy still reads well,
    # but check authenticates what the bucket holds
    admin = s3_server.client()
    (key,) = [o["Key"] for o in admin.list_objects_v2(Bucket=bucket, Prefix="repo/snapshots/")
              ["Contents"]]  # fmt: skip
    body = bytearray(admin.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[40] ^= 1
    admin.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    assert cli("--cache-dir", mine, "snapshots", "-q").code == 0
    check = cli("--cache-dir", mine, "check")
    assert check.code == 12, check.out + check.err
