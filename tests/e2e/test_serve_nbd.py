"""serve-nbd: the disks of a snapshot exported over NBD to qemu-img, qemu-io and nbdinfo,
byte-equal to a full restore; writable exports keep the backup unchanged; bad requests get
errors while the server goes on."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stratavault.errors import NbdError
from stratavault.jobs import ServeOptions, serve_snapshot
from stratavault.nbd import connect
from stratavault.repo import Repository
from stratavault.snapshot import find_snapshot
from stratavault.storage import LocalStorage
from tests.e2e.conftest import Cli
from tests.sources import vm_harness

pytestmark = pytest.mark.infra("qemu")
short_tmp = vm_harness.short_tmp
MiB = 1 << 20
SIZE = 64 * MiB


def _image(path: Path) -> None:
    """64 MiB, sparse: random data in 6 places (some unaligned), the rest zeros."""
    rng = random.Random(5)
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset in (0, 5 * MiB + 4097, 20 * MiB, 21 * MiB + 1, 40 * MiB - 3, SIZE - MiB):
            f.seek(offset)
            f.write(rng.randbytes(MiB))


@contextmanager
def _serving(cli: Cli, *args: str | Path) -> Iterator[dict[str, str]]:
    """Run ``serve-nbd`` as a real process; yield its exports (disk -> URI); stop it with
    SIGTERM and check it exits 0."""
    exe = Path(sys.executable).with_name("stratavault")
    proc = subprocess.Popen(
        [str(exe), "serve-nbd", *map(str, args), "--json"],
        env={**os.environ, **cli.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        doc = json.loads(line)
        assert doc["message_type"] == "serving"
        yield dict(doc["exports"])
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0


def _backup(cli: Cli, tmp: Path) -> tuple[Path, Path]:
    image, full = tmp / "disk.raw", tmp / "full.raw"
    _image(image)
    assert cli("init").code == 0
    assert cli("backup", "image", image, "-q").code == 0
    assert cli("restore", "disk", "latest", "--to", full, "-q").code == 0
    return image, full


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=120)


def test_export_reads_like_a_full_restore(cli: Cli, short_tmp: Path) -> None:
    image, full = _backup(cli, short_tmp)
    sock = short_tmp / "nbd.sock"
    with _serving(cli, "latest", "--socket", sock) as exports:
        ((name, uri),) = exports.items()
        # two clients at once, both QEMU's block layer
        procs = [
            subprocess.Popen(["qemu-img", "compare", "-f", "raw", "-F", "raw", full, uri])
            for _ in range(2)
        ]
        assert [p.wait(120) for p in procs] == [0, 0]
        assert full.read_bytes() == image.read_bytes()
        info = json.loads(_run("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["export-size"] == SIZE
        assert info["exports"][0]["is_read_only"] is True
        extents = json.loads(_run("nbdinfo", "--map", "--json", uri).stdout)
        holes = sum(e["length"] for e in extents if e["type"] & 1)
        assert holes >= SIZE // 2  # zero chunks are holes: 6 MiB of data in 4 MiB chunks
        read = _run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 30M 4M", uri)
        assert read.returncode == 0 and "read 4194304" in read.stdout, read.stdout + read.stderr
        listing = _run("nbdinfo", "--list", f"nbd+unix://?socket={sock}")
        assert name in listing.stdout


def test_writable_export_keeps_the_backup(cli: Cli, short_tmp: Path) -> None:
    _, full = _backup(cli, short_tmp)
    with _serving(cli, "latest", "--writable", "--listen", "127.0.0.1:0") as exports:
        (uri,) = exports.values()
        assert uri.startswith("nbd://127.0.0.1:")  # TCP, on the port the system chose
        for cmd in ("write -P 0xab 4097 70000", "write -z 20M 1M", "discard 40M 8M"):
            done = _run("qemu-io", "-f", "raw", "-c", cmd, uri)
            assert done.returncode == 0 and "error" not in done.stdout.lower(), done
        # another client sees the writes
        for cmd in ("read -P 0xab 4097 70000", "read -P 0 20M 1M", "read -P 0 40M 8M"):
            seen = _run("qemu-io", "-r", "-f", "raw", "-c", cmd, uri)
            assert seen.returncode == 0 and "Pattern verification failed" not in seen.stdout
        # the untouched bytes next to a partial block come from the backup
        copy = short_tmp / "copy.raw"
        assert _run("qemu-img", "convert", "-O", "raw", uri, copy).returncode == 0
        want = bytearray(full.read_bytes())
        want[4097 : 4097 + 70000] = b"\xab" * 70000
        want[20 * MiB : 21 * MiB] = bytes(MiB)
        want[40 * MiB : 48 * MiB] = bytes(8 * MiB)
        assert copy.read_bytes() == bytes(want)
    assert cli("check", "--read-data").code == 0
    again = short_tmp / "again.raw"
    assert cli("restore", "disk", "latest", "--to", again, "-q").code == 0
    assert again.read_bytes() == full.read_bytes()


_LIBNBD_BAD_REQUESTS = """
import sys
sys.path.append("/usr/lib/python3/dist-packages")
import nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = int(sys.argv[2])
for call in (lambda: h.pread(20, size - 10), lambda: h.pwrite(b"x" * 512, 0),
             lambda: h.trim(4096, 0)):
    try:
        call()
        print("no-error")
    except nbd.Error as exc:
        print({22: "EINVAL", 1: "EPERM"}.get(exc.errno, exc.errno))
h.pread(4096, 0)
print("ok")
"""


def test_bad_requests_get_errors_and_the_server_goes_on(cli: Cli, short_tmp: Path) -> None:
    _, full = _backup(cli, short_tmp)
    repo = Repository.open(
        LocalStorage(cli.repo), cli.password_file.read_text().strip().encode(), cache_dir=None
    )
    sock = short_tmp / "lib.sock"
    with (
        repo,
        serve_snapshot(repo, find_snapshot(repo, "latest"), ServeOptions(unix_path=sock)) as served,
    ):
        (uri,) = served.uris.values()
        # libnbd without its own checks sends what our client would refuse to send
        errors = _run("/usr/bin/python3", "-c", _LIBNBD_BAD_REQUESTS, uri, str(SIZE))
        assert errors.returncode == 0, errors.stderr
        assert errors.stdout.split() == ["EINVAL", "EPERM", "EPERM", "ok"], errors.stdout
        with pytest.raises(NbdError):
            connect(uri, export="no-such-disk")
        garbage = socket.socket(socket.AF_UNIX)
        garbage.connect(str(sock))
        garbage.recv(18)
        garbage.sendall(b"\xff" * 64)  # bad client flags and option magic
        assert garbage.recv(4096) == b""  # that client is dropped...
        garbage.close()
        with connect(uri) as disk:  # ... the others are served
            assert disk.read(5 * MiB, MiB) == full.read_bytes()[5 * MiB : 6 * MiB]
