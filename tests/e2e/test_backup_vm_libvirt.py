"""backup vm of a libvirt domain through the job and the command line: the same snapshots
and restores as for a QEMU process driven over QMP."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from stratavault.jobs import BackupVmOptions, RestoreDiskOptions, backup_vm, restore_disk
from stratavault.repo import KdfParams, Repository
from stratavault.storage import MemoryStorage
from tests.e2e.conftest import Cli
from tests.sources import libvirt_harness, vm_harness
from tests.sources.libvirt_harness import Domain
from tests.sources.vm_harness import KiB, MiB, reference_image

pytestmark = pytest.mark.infra("libvirt")
libvirtd = libvirt_harness.libvirtd
make_domain = libvirt_harness.make_domain
short_tmp = vm_harness.short_tmp


def _same(repo: Repository, snap_id: str, disk: str, ref: Path, tmp: Path) -> bool:
    from stratavault.snapshot import find_snapshot

    out = tmp / f"{snap_id[:8]}-{disk}.raw"
    restore_disk(repo, find_snapshot(repo, snap_id), RestoreDiskOptions(target=out, disk=disk))
    cmp = subprocess.run(["qemu-img", "compare", "-F", "qcow2", str(out), str(ref)], check=False)
    return cmp.returncode == 0


def test_libvirt_domain_incremental_backups(
    make_domain: Callable[..., Domain], libvirtd: libvirt_harness.Libvirtd, short_tmp: Path
) -> None:
    dom = make_domain((32, 16))
    dom.start()
    dom.write("vda", 0x11, 1 * MiB, 512 * KiB)
    repo = Repository.init(MemoryStorage(), b"pw", cache_dir=None, kdf=KdfParams.fast())
    opts = BackupVmOptions(libvirt_domain=dom.name, libvirt_uri=libvirtd.uri, host="h")
    first = backup_vm(repo, opts)
    assert first.kind == "vm" and first.paths == [dom.name]
    assert first.vm_config is not None and "<domain" in first.vm_config["domain_xml"]
    dom.write("vda", 0x12, 9 * MiB, 64 * KiB)
    dom.write("vdb", 0x13, 0, 64 * KiB)
    second = backup_vm(repo, opts)
    assert second.parent == first.id and second.summary.bytes_read <= 2 * 256 * KiB
    ref_a = reference_image(
        short_tmp / "a.qcow2", 32 * MiB, [(0x11, 1 * MiB, 512 * KiB), (0x12, 9 * MiB, 64 * KiB)]
    )
    ref_b = reference_image(short_tmp / "b.qcow2", 16 * MiB, [(0x13, 0, 64 * KiB)])
    assert _same(repo, second.id, "vda", ref_a, short_tmp)
    assert _same(repo, second.id, "vdb", ref_b, short_tmp)


def test_backup_vm_libvirt_from_the_command_line(
    cli: Cli, make_domain: Callable[..., Domain], libvirtd: libvirt_harness.Libvirtd
) -> None:
    dom = make_domain((16,))
    dom.start()
    dom.write("vda", 0x21, 0, 64 * KiB)
    assert cli("init").code == 0
    args = ("backup", "vm", "--libvirt", dom.name, "--connect", libvirtd.uri)
    res = cli(*args)
    assert res.code == 0 and "read in full" in res.out, res.out + res.err
    res = cli(*args, "--json")
    assert res.code == 0, res.err
    assert res.json_lines()[-1]["bytes_read"] == 0  # nothing written since
    both = cli("backup", "vm", "--libvirt", dom.name, "--qmp", "/nonexistent")
    assert both.code == 2
