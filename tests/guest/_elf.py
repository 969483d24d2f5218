"""Small readers and writers of binary formats the guest build needs, in pure Python.

ELF: the `.modinfo` of a kernel module (its `depends=` and `softdep=`) and the DT_NEEDED
entries of a dynamically linked program, so that modules and shared libraries are resolved
without depmod, ldd or binutils on the host. newc: the cpio format of an initramfs, written
directly so that device nodes need no mknod and no cpio tool.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

_SHT_DYNAMIC = 6
_DT_NEEDED = 1


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int


def _sections(data: bytes, what: Path) -> list[_Section]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"read ELF {what}: not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size, link = struct.unpack_from(
            "<IIQQQQI", data, shoff + i * shentsize
        )
        raw.append((name, typ, off, size, link))
    str_off = raw[shstrndx][2]

    def cstr(at: int) -> str:
        return data[at : data.index(b"\0", at)].decode()

    return [_Section(cstr(str_off + n), t, o, s, lk) for n, t, o, s, lk in raw]


def modinfo(path: Path) -> dict[str, list[str]]:
    """The key=value entries of a kernel module's `.modinfo` section (a key may repeat)."""
    data = path.read_bytes()
    info: dict[str, list[str]] = {}
    for sec in _sections(data, path):
        if sec.name != ".modinfo":
            continue
        for entry in data[sec.offset : sec.offset + sec.size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def needed_libraries(path: Path) -> list[str]:
    """The DT_NEEDED sonames of a dynamically linked ELF file (empty for a static one)."""
    data = path.read_bytes()
    secs = _sections(data, path)
    names: list[str] = []
    for sec in secs:
        if sec.type != _SHT_DYNAMIC:
            continue
        strtab = secs[sec.link]
        for at in range(sec.offset, sec.offset + sec.size, 16):
            tag, val = struct.unpack_from("<qQ", data, at)
            if tag == _DT_NEEDED:
                start = strtab.offset + val
                names.append(data[start : data.index(b"\0", start)].decode())
    return names


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive: a file (data), a directory, a symlink or a device node."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc_gz(entries: list[CpioEntry], dest: Path) -> None:
    """Write `entries` as a gzip-compressed newc cpio archive (the initramfs format)."""
    out = bytearray()
    for ino, e in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        fields = (
            ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += e.data + _pad4(len(e.data))
    out += _pad4(len(out)) + b"\0" * (-len(out) % 512)
    dest.write_bytes(gzip.compress(bytes(out), compresslevel=6, mtime=0))
