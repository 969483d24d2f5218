"""Start-up of the command line: building the parser loads no job, repository or NBD code;
a command loads what it runs, not what the other commands need.

Each command runs in a fresh interpreter (this process has imported everything already),
which then reports ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stratavault.cli._context import _import_in_background
from stratavault.cli._preload import backup_modules, has_image_magic, restore_modules
from stratavault.errors import PassphraseError
from stratavault.jobs import DEFAULT_DISK_CHUNK_BYTES, DISK_FORMATS
from stratavault.sources import DEFAULT_LIBVIRT_URI
from tests.e2e.conftest import Cli

_PROBE = """
import json, sys
from stratavault.cli import run
code = run(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""

# What no command that lists or backs up needs: other commands' job code, the NBD server,
# asyncio (QMP), urllib.request/http.client (pulled in by xml.sax.saxutils).
NOT_FOR_LISTING = (
    "stratavault.jobs",
    "stratavault.nbd",
    "stratavault.sources",
    "asyncio",
    "urllib.request",
    "http.client",
    "xml.sax.saxutils",
    "rich",
    "botocore",
)
OTHER_COMMANDS_JOBS = (
    "stratavault.jobs._restore_files",
    "stratavault.jobs._restore_disk",
    "stratavault.jobs._restore_vm",
    "stratavault.jobs._serve",
    "stratavault.jobs._flr",
    "stratavault.jobs._forget",
    "stratavault.jobs._copy",
    "stratavault.jobs._prune",
    "stratavault.jobs._check",
    "stratavault.jobs._verify",
    "stratavault.jobs._instant",
    "stratavault.jobs._backup_files",
    "stratavault.jobs._backup_run",
    "asyncio",
    "rich",
    "urllib.request",
    "http.client",
    "botocore",
)


# Records what is loaded when the key derivation starts (its 32 MiB should not add up
# with numpy's and the chunk index's, and it should not wait for modules it does not
# need, such as the codec), then runs the command.
_KDF_PROBE = """
import json, sys
from stratavault.repo._crypto import KdfParams
derive, seen = KdfParams.derive, []
def probe(*args, **kwargs):
    seen.append(sorted(sys.modules))
    return derive(*args, **kwargs)
KdfParams.derive = probe
from stratavault.cli import run
code = run(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": seen[0] if seen else []}, f)
"""


def _imports(
    cli: Cli, tmp_path: Path, *args: str | Path, probe: str = _PROBE
) -> tuple[int, set[str]]:
    """Exit code of ``stratavault ARGS`` in a fresh interpreter, and the modules it loaded."""
    report = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(report), *map(str, args)],
        env={**os.environ, **cli.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert report.exists(), proc.stderr
    doc = json.loads(report.read_text())
    return doc["code"], set(doc["modules"])


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` (or below them) that were loaded."""
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_version_and_help_load_no_layer_below_the_cli(cli: Cli, tmp_path: Path) -> None:
    heavy = (
        *NOT_FOR_LISTING,
        "stratavault.repo",
        "stratavault.storage",
        "stratavault.snapshot",
        "numpy",
        "zstandard",
        "cryptography",
        "botocore",
    )
    for args in (["--version"], ["--help"], ["restore", "--help"], ["backup", "vm", "--help"]):
        code, modules = _imports(cli, tmp_path, *args)
        assert code == 0, args
        assert _loaded(modules, heavy) == [], args


def test_snapshots_loads_no_job_or_nbd_code(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x" * 1000)
    assert cli("init").code == 0
    assert cli("backup", "files", tmp_path / "src", "-q").code == 0
    code, modules = _imports(cli, tmp_path, "snapshots", "--json")
    assert code == 0
    assert "stratavault.snapshot" in modules  # it did list them
    # stratavault.repo._collect (numpy) is still loaded: the repository imports it.
    assert _loaded(modules, NOT_FOR_LISTING) == []


def test_backup_image_loads_no_other_commands_job_code(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 20))
    assert cli("init").code == 0
    code, modules = _imports(cli, tmp_path, "backup", "image", disk, "-q")
    assert code == 0
    assert "stratavault.jobs._backup_disk" in modules  # it did back up
    assert _loaded(modules, OTHER_COMMANDS_JOBS) == []
    # Nor the VM backup's: libvirt's code and the XML parser it needs.
    vm_only = ("stratavault.jobs._backup_vm", "stratavault.sources._libvirt", "xml.etree")
    assert _loaded(modules, vm_only) == []


def test_restore_disk_loads_no_backup_job_code(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 20))
    assert cli("init").code == 0
    assert cli("backup", "image", disk, "-q").code == 0
    code, modules = _imports(cli, tmp_path, "restore", "disk", "latest", "--to", tmp_path / "o")
    assert code == 0
    assert "stratavault.jobs._restore_disk" in modules  # it did restore
    backup_jobs = ("stratavault.jobs._backup_disk", "stratavault.jobs._backup_images")
    assert _loaded(modules, (*backup_jobs, "stratavault.jobs._backup_files")) == []


def test_file_backups_derive_the_key_before_loading_numpy(cli: Cli, tmp_path: Path) -> None:
    """The key derivation's memory peak and the repository layer's do not add up (a disk
    backup, whose peak comes later, loads its modules while the key is derived)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1 << 20))
    assert cli("init").code == 0
    code, modules = _imports(cli, tmp_path, "backup", "files", src, "-q", probe=_KDF_PROBE)
    assert code == 0
    assert "stratavault.repo._keyring" in modules  # the probe saw the derivation
    assert _loaded(modules, ("numpy", "stratavault.repo._repository", "zstandard")) == []


# Records OPENBLAS_NUM_THREADS when numpy is first imported, then runs the command.
_BLAS_PROBE = """
import json, os, sys
seen = []
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            seen.append(os.environ.get("OPENBLAS_NUM_THREADS"))
sys.meta_path.insert(0, Probe())
from stratavault.cli import run
code = run(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": seen}, f)
"""


def test_numpy_loads_without_a_blas_thread_pool(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """numpy's BLAS is unused; its thread pool would cost every disk command ~25 ms."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 20))
    assert cli("init").code == 0
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)  # an in-process run set it
    code, seen = _imports(cli, tmp_path, "backup", "image", disk, "-q", probe=_BLAS_PROBE)
    assert code == 0
    assert set(seen) == {"1"}


def test_help_shows_the_defaults_of_the_layers_below(cli: Cli) -> None:
    """The parser shows the defaults the layers below use (stratavault/_defaults.py)."""
    pages = {}
    for args in (("restore",), ("backup", "image"), ("backup", "vm")):
        result = cli(*args, "--help")
        assert result.code == 0
        pages[args] = " ".join(result.out.split())
    assert "{" + ",".join(DISK_FORMATS) + "}" in pages[("restore",)]
    assert f"(default {DEFAULT_DISK_CHUNK_BYTES >> 10})" in pages[("backup", "image")]
    assert f"(default {DEFAULT_LIBVIRT_URI})" in pages[("backup", "vm")]


def test_preload_leaves_import_failures_to_the_command() -> None:
    name = "colorsys"  # a module nothing here imports
    sys.modules.pop(name, None)
    _import_in_background(["no_such_module_here", name]).join(30)  # raises nothing, stops
    assert name not in sys.modules
    _import_in_background(["json", name]).join(30)
    assert name in sys.modules


def test_disk_commands_work_with_preload(cli: Cli, tmp_path: Path) -> None:
    """The key is derived in a thread while the modules load; a wrong passphrase is still
    reported as such."""
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4M"], check=True)
    assert cli("init").code == 0
    assert cli("backup", "image", disk, "-q").code == 0
    assert cli("restore", "disk", "latest", "--to", tmp_path / "out.raw", "-q").code == 0
    (tmp_path / "wrong").write_text("not the passphrase\n")
    wrong = cli("backup", "image", disk, "-q", "--password-file", tmp_path / "wrong")
    assert wrong.code == PassphraseError.exit_code, wrong.err
    assert "passphrase" in wrong.err


def test_disk_images_that_qemu_opens_are_recognised(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(4096))
    for fmt in ("qcow2", "vmdk", "vhdx", "vdi", "vpc"):
        img = tmp_path / f"disk.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "1M"], check=True)
        assert has_image_magic(img), fmt
    assert not has_image_magic(raw)
    assert not has_image_magic(tmp_path / "missing")
    qcow2 = tmp_path / "disk.qcow2"
    assert "qemu.qmp" not in backup_modules([raw]) + restore_modules(raw, qcow2=False)
    assert "qemu.qmp" in backup_modules([raw, qcow2])
    assert "qemu.qmp" in backup_modules(vm=True, qmp=True)
    assert "stratavault.jobs._backup_images" in backup_modules([raw])
    assert "stratavault.jobs._backup_vm" in backup_modules(vm=True)
    assert "qemu.qmp" in restore_modules(qcow2, qcow2=False)
    assert "qemu.qmp" in restore_modules(None, qcow2=True)


def test_the_console_script_lists_the_files_it_loaded(cli: Cli, tmp_path: Path) -> None:
    """``stratavault`` notes what a command loaded (bytecode, native libraries) for the
    next run to read ahead; a damaged list is ignored, ``--no-cache`` writes none, and the
    command line run inside a program (``run``) leaves them alone."""
    assert cli("init").code == 0
    manifest = tmp_path / "cache" / "startup" / "snapshots-run.files"
    assert cli("snapshots").code == 0 and not manifest.exists()  # in this process
    assert cli.subprocess("snapshots").code == 0
    files = manifest.read_text().splitlines()
    assert any(f.endswith(".pyc") and "/stratavault/cli/" in f for f in files), files[:5]
    assert any("/libc.so" in f for f in files)
    manifest.write_bytes(b"\xff\x00 damaged")
    result = cli.subprocess("snapshots")
    assert (result.code, result.err) == (0, "")
    assert sorted(manifest.read_text().splitlines()) == sorted(files)  # listed anew
    other = tmp_path / "cache2"
    env = {"STRATAVAULT_CACHE_DIR": str(other)}
    assert cli.subprocess("snapshots", "--no-cache", env=env).code == 0
    assert not other.exists()


def test_a_user_without_a_home_folder_runs_without_a_cache(cli: Cli) -> None:
    """No ``HOME``, no entry in the user database, no cache folder given: nowhere to put
    the local caches, so the command goes without them (slower, not broken)."""
    base = Path(tempfile.mkdtemp(prefix="sv-homeless-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        user = Cli(base, cli._capsys)
        assert user("init").code == 0
        for dirpath, _dirs, files in os.walk(base):
            os.chown(dirpath, 54321, 54321)
            for f in files:
                os.chown(os.path.join(dirpath, f), 54321, 54321)
        env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME")}
        env.update(user.env)
        del env["STRATAVAULT_CACHE_DIR"]
        exe = Path(sys.executable).with_name("stratavault")
        uid = ["setpriv", "--reuid=54321", "--regid=54321", "--clear-groups"]
        proc = subprocess.run(
            [*uid, str(exe), "snapshots", "--json"], env=env, capture_output=True, text=True
        )
        assert (proc.returncode, proc.stderr) == (0, "")
        assert json.loads(proc.stdout) == []
    finally:
        shutil.rmtree(base)
