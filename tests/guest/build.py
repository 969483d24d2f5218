"""Build the test guest: a small real Linux guest made from Debian packages, cached per machine.

What is built (into ``$STRATAVAULT_GUEST_CACHE``, default ``/var/cache/stratavault-test-guest``,
in a folder named after a hash of this recipe and of the package versions, so that a changed
recipe or a new kernel rebuilds, and an unchanged one is reused):

- ``vmlinuz``: Debian 12's kernel, from the package that ``linux-image-amd64`` depends on;
- ``initrd.img``: busybox, the modules that reach virtio disks and mount ext4, and an /init that
  mounts partition 1 of the first virtio disk and switch_roots into it;
- ``boot.qcow2``: a GPT disk whose partition 1 is an ext4 root with busybox, qemu-ga and its
  libraries, and an init that prints ``stratavault-guest: init started``, starts qemu-ga on the
  virtio-serial port ``org.qemu.guest_agent.0``, mounts /dev/vdb on /data, prints
  ``stratavault-guest: ready`` and, with ``sv.writer=1`` on the kernel command line, keeps
  rewriting files on /data.

The .deb files are fetched with ``apt-get download`` into ``debs/`` of the cache and reused.
Nothing is mounted and nothing is installed on the host. Run as a script to build and print
the paths and a QEMU command line: ``python tests/guest/build.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests.guest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.guest import _scripts
from tests.guest._elf import CpioEntry, modinfo, needed_libraries, write_newc_gz

CACHE_ENV = "STRATAVAULT_GUEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/stratavault-test-guest")
RECIPE_VERSION = "1"
KERNEL_META_PACKAGE = "linux-image-amd64"
AGENT_PACKAGE = "qemu-guest-agent"
BUSYBOX_PACKAGE = "busybox-static"
# Loaded in the initramfs with their dependencies (read from each module's .modinfo).
# crc32c_generic: ext4 asks the crypto API for crc32c (metadata_csum), a soft dependency.
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4")
BOOT_DISK_SIZE = 128 << 20
DEFAULT_APPEND = "console=ttyS0 root=/dev/vda1 rw quiet panic=-1"
INIT_MARKER = _scripts.INIT_MARKER
READY_MARKER = _scripts.READY_MARKER
ROOT_FAILED_MARKER = _scripts.ROOT_FAILED_MARKER
# Host tool -> the Debian package that provides it.
HOST_TOOLS = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mke2fs": "e2fsprogs",
    "sfdisk": "fdisk",
    "dd": "coreutils",
    "tar": "tar",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
}
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
_PRUNE = (
    "usr/share",
    "lib/systemd",
    "usr/lib/systemd",
    "etc/init.d",
    "usr/lib/x86_64-linux-gnu/gconv",
)

Log = Callable[[str], None]


class GuestBuildError(RuntimeError):
    """The test guest could not be built (a missing host tool, apt, a package's content)."""


@dataclass(frozen=True)
class GuestImage:
    """A built test guest in the cache. Its files are shared: never write to them."""

    root: Path
    version: str
    kernel: Path
    initrd: Path
    boot_disk: Path

    def append(self, *extra: str) -> str:
        """The kernel command line, with `extra` words (e.g. ``sv.writer=1``) added."""
        return " ".join([DEFAULT_APPEND, *extra])

    def boot_overlay(self, dest: Path, size: int | None = None) -> Path:
        """A fresh qcow2 at `dest` backed by the boot disk (optionally with a larger size)."""
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.boot_disk)]
        _run([*cmd, str(dest), *([str(size)] if size else [])], "create boot overlay")
        return dest


def cache_dir() -> Path:
    """The cache folder: ``$STRATAVAULT_GUEST_CACHE``, else the default when this user may
    write there, else ``~/.cache/stratavault-test-guest``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    usable = DEFAULT_CACHE if DEFAULT_CACHE.exists() else DEFAULT_CACHE.parent
    if os.access(usable, os.W_OK):
        return DEFAULT_CACHE
    return Path.home() / ".cache" / DEFAULT_CACHE.name


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    cmd = [_which(cmd[0]) or cmd[0], *cmd[1:]]
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{what}: {cmd[0]} is not installed ({exc})") from exc
    if done.returncode != 0:
        raise GuestBuildError(
            f"{what}: `{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def check_host_tools() -> None:
    """Fail with one clear message naming every missing host tool and its Debian package."""
    missing = [f"{t} (Debian package {p})" for t, p in HOST_TOOLS.items() if not _which(t)]
    if missing:
        raise GuestBuildError(
            "build the test guest: missing host tools: " + ", ".join(missing)
            + "; scripts/setup.sh installs them"
        )  # fmt: skip


@dataclass(frozen=True)
class _Deb:
    package: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        # The name apt-get download gives the file (epoch ':' escaped).
        return f"{self.package}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _depends_names(args: list[str]) -> list[str]:
    out = _run(["apt-cache", "depends", *args], f"resolve {args[-1]}")
    names = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            line = line.removeprefix("Depends:").strip()
        elif line.startswith(("PreDepends:", "|")) or ":" in line:
            continue
        if line and not line.startswith("<") and line not in names:
            names.append(line)
    return names


def resolve_packages() -> list[_Deb]:
    """The candidate versions of the kernel, busybox, qemu-ga and qemu-ga's libraries."""
    kernel = [n for n in _depends_names([KERNEL_META_PACKAGE]) if n.startswith("linux-image-6.")]
    if not kernel:
        raise GuestBuildError(f"resolve {KERNEL_META_PACKAGE}: no linux-image-6.* dependency")
    recurse = ["--recurse", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks"]
    recurse += ["--no-replaces", "--no-enhances", "--no-pre-depends", AGENT_PACKAGE]
    agent = [n for n in _depends_names(recurse) if n != KERNEL_META_PACKAGE]
    names = [kernel[0], BUSYBOX_PACKAGE, *agent]
    out = _run(["apt-cache", "show", "--no-all-versions", *names], "look up package versions")
    debs: list[_Deb] = []
    fields: dict[str, str] = {}
    for line in [*out.splitlines(), ""]:
        if not line.strip():
            if "Package" in fields:
                debs.append(_Deb(fields["Package"], fields["Version"], fields["Architecture"]))
            fields = {}
        elif not line.startswith(" ") and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    found = {d.package for d in debs}
    if set(names) - found:
        raise GuestBuildError(
            f"look up package versions: not found: {sorted(set(names) - found)}"
            " (are apt's package lists there? apt-get update)"
        )
    return debs


def download(debs: list[_Deb], dest: Path, log: Log) -> list[Path]:
    """The .deb files of `debs` in `dest`, fetched with ``apt-get download`` when absent."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [d for d in debs if not (dest / d.filename).exists()]
    if missing:
        log(f"downloading {len(missing)} Debian packages into {dest}")
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            os.chmod(tmp, 0o777)  # apt's sandbox user may write there
            _run(["apt-get", "download", *[f"{d.package}={d.version}" for d in missing]],
                 "download the guest's Debian packages", cwd=Path(tmp))  # fmt: skip
            for d in missing:
                src = Path(tmp) / d.filename
                if not src.exists():
                    raise GuestBuildError(f"download {d.package}: apt-get made no {d.filename}")
                src.rename(dest / d.filename)
    return [dest / d.filename for d in debs]


def _recipe_hash() -> str:
    h = hashlib.sha256(RECIPE_VERSION.encode())
    for name in ("build.py", "_elf.py", "_scripts.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def recipe_version(debs: list[_Deb]) -> str:
    """A hash of this recipe's sources and the package versions: the cache key."""
    h = hashlib.sha256(_recipe_hash().encode())
    for d in debs:
        h.update(d.filename.encode())
    return h.hexdigest()[:16]


def _image(root: Path) -> GuestImage:
    return GuestImage(root, root.name, root / "vmlinuz", root / "initrd.img", root / "boot.qcow2")


def _built_versions(cache: Path) -> list[tuple[float, Path, dict[str, object]]]:
    """(mtime, folder, manifest) of the finished builds in `cache`, newest first."""
    found = []
    for manifest in cache.glob("*/manifest.json"):
        found.append((manifest.stat().st_mtime, manifest.parent, json.loads(manifest.read_text())))
    return sorted(found, key=lambda t: t[0], reverse=True)


def ensure_image(cache: Path | None = None, log: Log = lambda _m: None) -> GuestImage:
    """The test guest of this machine, built into the cache on first use (safe across processes).

    When apt cannot say which packages are current (no package lists), a build of this same
    recipe already in the cache is used.
    """
    check_host_tools()
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        debs = resolve_packages()
    except GuestBuildError as exc:
        same = [p for _t, p, m in _built_versions(cache) if m.get("recipe") == _recipe_hash()]
        if not same:
            raise
        log(f"using the cached build {same[0].name}: {exc}")
        return _image(same[0])
    final = cache / recipe_version(debs)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "manifest.json").exists():
            files = download(debs, cache / "debs", log)
            tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=cache))
            try:
                _build(tmp, debs, files, log)
                tmp.chmod(0o755)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _prune_old_builds(cache, keep=final)
    return _image(final)


def _prune_old_builds(cache: Path, keep: Path) -> None:
    """Remove other builds older than a day (another checkout may still use a recent one)."""
    for mtime, folder, _m in _built_versions(cache):
        if folder != keep and time.time() - mtime > 86400:
            shutil.rmtree(folder, ignore_errors=True)


def _build(out: Path, debs: list[_Deb], files: list[Path], log: Log) -> None:
    started = time.monotonic()
    work = out / "work"
    kernel_root, rootfs = work / "kernel", work / "rootfs"
    work.mkdir()
    _extract_kernel(files[0], kernel_root)
    for deb in files[1:]:
        _run(["dpkg-deb", "-x", str(deb), str(rootfs)], f"extract {deb.name}")
    vmlinuz = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise GuestBuildError(f"build the test guest: no boot/vmlinuz-* in {files[0].name}")
    shutil.copyfile(vmlinuz[0], out / "vmlinuz")
    modules = _resolve_modules(kernel_root)
    _build_initramfs(out / "initrd.img", rootfs / "bin" / "busybox", modules)
    _populate_rootfs(rootfs)
    _make_gpt_disk(rootfs, out / "boot.qcow2", BOOT_DISK_SIZE, work)
    shutil.rmtree(work)
    seconds = round(time.monotonic() - started, 1)
    manifest = {
        "packages": [d.filename for d in debs],
        "modules": [m.name for m in modules],
        "build_seconds": seconds,
        "recipe": _recipe_hash(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"built the test guest in {seconds} s")


# What the build needs of the kernel package (a full extraction writes 400 MB).
_KERNEL_DIRS = ("drivers/virtio", "drivers/block", "drivers/char", "fs", "crypto", "lib")
_KERNEL_MEMBERS = (
    "./boot/vmlinuz-*",
    "./lib/modules/*/modules.builtin",
    *(f"./lib/modules/*/kernel/{d}/*" for d in _KERNEL_DIRS),
)


def _extract_kernel(deb: Path, dest: Path) -> None:
    """Unpack the kernel and the module folders the initramfs draws from."""
    dest.mkdir()
    what = f"extract {deb.name}"
    dpkg = subprocess.Popen(
        [_which("dpkg-deb") or "dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert dpkg.stdout is not None
    try:
        tar = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *_KERNEL_MEMBERS],
                             stdin=dpkg.stdout, capture_output=True, check=False)  # fmt: skip
    finally:
        dpkg.stdout.close()
        dpkg_err = dpkg.stderr.read() if dpkg.stderr else b""
        dpkg.wait()
    if dpkg.returncode != 0 or tar.returncode != 0:
        err = (dpkg_err + tar.stderr).decode(errors="replace").strip()
        raise GuestBuildError(f"{what}: dpkg-deb --fsys-tarfile | tar -x failed: {err[-2000:]}")


def _module_name(path: Path | str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def _resolve_modules(kernel_root: Path) -> list[Path]:
    """The .ko files for MODULES, dependencies first; built-in modules are left out."""
    (moddir,) = (kernel_root / "lib" / "modules").iterdir()
    builtin = {_module_name(p) for p in (moddir / "modules.builtin").read_text().split()}
    index = {_module_name(p): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise GuestBuildError(f"build the initramfs: no module {name} in {moddir.name}")
        info = modinfo(index[name])
        deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
        soft = [w for v in info.get("softdep", []) for w in v.split() if not w.endswith(":")]
        for dep in deps + [s for s in soft if _module_name(s) in index]:
            visit(_module_name(dep))
        order.append(index[name])

    for name in MODULES:
        visit(name)
    return order


def _build_initramfs(dest: Path, busybox: Path, modules: list[Path]) -> None:
    dirs = ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"]
    entries = [CpioEntry(d, 0o040755) for d in dirs]
    entries += [
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("dev/null", 0o020666, rdev=(1, 3)),
        CpioEntry("bin/busybox", 0o100755, busybox.read_bytes()),
        CpioEntry("init", 0o100755, _scripts.INITRAMFS_INIT.encode()),
    ]
    order = "".join(_module_name(m) + "\n" for m in modules).encode()
    entries.append(CpioEntry("modules.order", 0o100644, order))
    entries += [
        CpioEntry(f"lib/modules/{_module_name(m)}.ko", 0o100644, m.read_bytes()) for m in modules
    ]
    write_newc_gz(entries, dest)


def _write(path: Path, text: str, mode: int = 0o755) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def _populate_rootfs(root: Path) -> None:
    """Busybox applets, the scripts, and a check that qemu-ga finds all its libraries."""
    for sub in _PRUNE:
        shutil.rmtree(root / sub, ignore_errors=True)
    applets = _run([str(root / "bin" / "busybox"), "--list-full"], "list busybox applets")
    for rel in applets.split():
        link = root / rel
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    for d in ("dev", "proc", "sys", "run", "tmp", "data", "root"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var").mkdir(exist_ok=True)
    if not (root / "var" / "run").exists():
        (root / "var" / "run").symlink_to("/run")
    _write(root / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)
    _write(root / "etc" / "group", "root:x:0:\n", 0o644)
    _write(root / "etc" / "hostname", "sv-guest\n", 0o644)
    _write(root / "sbin" / "init", _scripts.ROOT_INIT)
    _write(root / "sbin" / "shutdown", _scripts.SHUTDOWN)
    _write(root / "usr" / "bin" / "sv-writer", _scripts.WRITER)
    _write(root / "usr" / "bin" / "sv-write", _scripts.WRITE_FILE)
    _check_libraries(root, root / "usr" / "sbin" / "qemu-ga")


def _check_libraries(root: Path, program: Path) -> None:
    todo, done = [program], set()
    while todo:
        elf = todo.pop()
        for soname in needed_libraries(elf):
            if soname in done:
                continue
            done.add(soname)
            hits = [root / d / soname for d in _LIB_DIRS if (root / d / soname).exists()]
            if not hits:
                raise GuestBuildError(
                    f"build the root filesystem: {soname}, needed by {elf.name}, is in none of "
                    f"the downloaded packages (add its package to the recipe)"
                )
            todo.append(hits[0].resolve())


def make_ext4(dest: Path, source: Path, size: int, label: str) -> Path:
    """A raw ext4 filesystem image of `size` bytes holding `source`'s tree (no mount)."""
    with open(dest, "wb") as f:
        f.truncate(size)
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-E", "root_owner=0:0",
          "-d", str(source), str(dest)], f"make ext4 {dest.name}")  # fmt: skip
    return dest


def _make_gpt_disk(source: Path, dest: Path, size: int, work: Path) -> None:
    """A qcow2 disk: GPT, partition 1 (from 1 MiB to 1 MiB before the end) ext4 of `source`."""
    part = make_ext4(work / "part.ext4", source, size - (2 << 20), "svroot")
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    sectors = (size - (2 << 20)) // 512
    table = f"label: gpt\nstart=2048, size={sectors}, type=L, name=svroot\n"
    sfdisk = [_which("sfdisk") or "sfdisk", "-q", str(raw)]
    done = subprocess.run(sfdisk, input=table, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise GuestBuildError(f"partition {raw.name} with sfdisk: {done.stderr.strip()}")
    _run(["dd", f"if={part}", f"of={raw}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"],
         "copy the root filesystem into the disk")  # fmt: skip
    _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(dest)],
         f"convert {raw.name} to qcow2")  # fmt: skip


def make_data_disk(
    dest: Path, files: Mapping[str, bytes] | None = None, size: int = 64 << 20, fmt: str = "qcow2"
) -> Path:
    """A data disk at `dest`: ext4 on the whole disk (the guest's /dev/vdb), with `files`
    (path relative to the filesystem root -> content); `fmt` is ``qcow2`` or ``raw``."""
    files = {"README": b"stratavault test guest data disk\n"} if files is None else files
    with tempfile.TemporaryDirectory(prefix="sv-data-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        for rel, data in files.items():
            path = tree / rel.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        raw = dest if fmt == "raw" else Path(tmp) / "data.raw"
        make_ext4(raw, tree, size, "svdata")
        if fmt != "raw":
            _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(dest)],
                 f"convert the data disk to {fmt}")  # fmt: skip
    return dest


def break_root_filesystem(disk: Path, fmt: str = "qcow2") -> None:
    """Zero the ext4 superblock of partition 1 of `disk` (an overlay!): it can no longer boot."""
    _run(["qemu-io", "-f", fmt, "-c", f"write -z {(1 << 20)} 64k", str(disk)],
         f"zero the root superblock of {disk.name}")  # fmt: skip


def qemu_command(image: GuestImage, boot_disk: Path, data_disk: Path | None = None) -> list[str]:
    """A QEMU command line that boots `image` by hand, console on the terminal."""
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-M", "q35", "-m", "256M",
           "-nodefaults", "-nographic", "-serial", "mon:stdio", "-kernel", str(image.kernel),
           "-initrd", str(image.initrd), "-append", image.append(), "-no-reboot",
           "-drive", f"file={boot_disk},if=virtio,format=qcow2"]  # fmt: skip
    if data_disk:
        cmd += ["-drive", f"file={data_disk},if=virtio,format=qcow2"]
    return cmd


def main() -> int:
    """Build (or find) the test guest and print where it is and how to boot it."""
    try:
        started = time.monotonic()
        image = ensure_image(log=lambda m: print(m, file=sys.stderr))
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"test guest {image.version} ready in {time.monotonic() - started:.1f} s: {image.root}")
    print("boot it by hand (Ctrl-a x quits):")
    print("  qemu-img create -f qcow2 -F qcow2 -b", image.boot_disk, "/tmp/sv-boot.qcow2")
    quoted = [f'"{a}"' if " " in a else a for a in qemu_command(image, Path("/tmp/sv-boot.qcow2"))]
    print("  " + " ".join(quoted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
