"""Our NBD server read and written by real peers: qemu-img, nbdinfo, qemu-io and QEMU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stratavault.nbd import NbdServer

from .conftest import nbdinfo_map, need, qemu_img_map, run, wait_for_socket

pytestmark = pytest.mark.infra("qemu")
MiB = 1024 * 1024


def test_qemu_img_convert_compare_and_nbdinfo(
    tmp_path: Path, served: tuple[NbdServer, Path, Path]
) -> None:
    need("qemu-img", "nbdinfo")
    server, source, _ = served
    uri = server.uri("ro")
    run("qemu-img", "compare", "-f", "raw", source, uri)
    copy = tmp_path / "copy.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", uri, copy)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, copy)
    assert int(run("nbdinfo", "--size", uri)) == source.stat().st_size
    assert nbdinfo_map(uri) == qemu_img_map(source, "raw")
    listed = run("nbdinfo", "--list", "--json", server.uri())
    assert '"export-name": "ro"' in listed and '"export-name": "rw"' in listed
    info = run("nbdinfo", "--json", uri)
    assert '"is_read_only": true' in info


def test_qemu_io_writes_to_a_writable_export(served: tuple[NbdServer, Path, Path]) -> None:
    need("qemu-io")
    server, _, target = served
    uri = server.uri("rw")
    run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 1M 64k",
        "-c", "write -P 0xcd 2M 1M",
        "-c", "write -z 2M 4k",
        "-c", "write -z -u 2560k 64k",
        "-c", "discard 2816k 64k",
        "-c", "flush",
        uri,
    )  # fmt: skip
    data = target.read_bytes()
    assert data[MiB : MiB + 65536] == b"\xab" * 65536
    assert data[2 * MiB : 2 * MiB + 4096] == bytes(4096)
    assert data[2 * MiB + 4096 : 2560 * 1024] == b"\xcd" * (512 * 1024 - 4096)
    assert data[2560 * 1024 : 2624 * 1024] == bytes(64 * 1024)
    assert data[2624 * 1024 : 2816 * 1024] == b"\xcd" * (192 * 1024)
    assert data[2816 * 1024 : 2880 * 1024] == bytes(64 * 1024)
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 1M 64k", uri)
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", server.uri("ro")],
        capture_output=True,
        text=True,
    )
    assert "write failed" in out.stderr + out.stdout or out.returncode != 0


def test_qemu_system_reads_and_writes_through_our_server(
    tmp_path: Path, served: tuple[NbdServer, Path, Path]
) -> None:
    need("qemu-system-x86_64")
    from qemu.qmp.legacy import QEMUMonitorProtocol

    server, _, target = served
    with target.open("r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\x3c" * 65536)
    qmp_path, log = tmp_path / "vm.qmp", tmp_path / "vm.log"
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                "qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-m", "64M",
                "-nodefaults", "-display", "none", "-no-user-config", "-S",
                "-qmp", f"unix:{qmp_path},server=on,wait=off",
                "-blockdev",
                f"driver=nbd,node-name=n0,server.type=unix,server.path={server.address},export=rw",
                "-device", "virtio-blk-pci,drive=n0,id=vda",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_socket(qmp_path, proc)
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        dev = "/machine/peripheral/vda/virtio-backend"
        # qemu-io run through HMP prints its results on QEMU's stdout (the log)
        for command in (
            "write -P 0x5a 3M 64k",
            "read -P 0x5a 3M 64k",
            "read -P 0x3c 5M 64k",
            "read -P 0x77 5M 64k",
            "flush",
        ):
            qmp.cmd("human-monitor-command", **{"command-line": f'qemu-io -d {dev} "{command}"'})
        qmp.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    text = log.read_text()
    assert "wrote 65536/65536 bytes at offset 3145728" in text
    assert text.count("read 65536/65536") == 3
    assert text.count("Pattern verification failed") == 1
    assert "Pattern verification failed at offset 5242880" in text
    assert target.read_bytes()[3 * MiB : 3 * MiB + 65536] == b"\x5a" * 65536
