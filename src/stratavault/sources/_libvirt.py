"""A libvirt domain seen by a backup: connection, lookup, disks and configuration.

``libvirt-python`` (the ``stratavault[libvirt]`` extra) is imported on first use
only, so commands that never touch libvirt do not pay for it. Every libvirt
failure becomes a :class:`~stratavault.errors.SourceError` naming the operation,
the domain and libvirt's message.
"""

from __future__ import annotations

import contextlib
import functools
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from stratavault._defaults import DEFAULT_LIBVIRT_URI
from stratavault.errors import SourceError

__all__ = ["DEFAULT_LIBVIRT_URI", "DomainDisk", "LibvirtDomain", "libvirt_module"]

_AGENT_CHANNEL = "org.qemu.guest_agent.0"


@functools.cache
def libvirt_module() -> Any:
    """The ``libvirt`` module, imported now (its default stderr error printer silenced)."""
    try:
        import libvirt
    except ImportError as exc:
        raise SourceError(
            "using libvirt - the libvirt-python package is not installed"
            " (pip install 'stratavault[libvirt]'; it builds against libvirt-dev)"
        ) from exc
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


@contextlib.contextmanager
def libvirt_errors(operation: str) -> Iterator[None]:
    """Turn a ``libvirtError`` raised inside the block into a SourceError about ``operation``."""
    libvirt = libvirt_module()
    try:
        yield
    except libvirt.libvirtError as exc:
        raise SourceError(f"{operation} - {exc.get_error_message() or exc}") from exc


@dataclass(frozen=True)
class DomainDisk:
    """One disk of a libvirt domain, from its live (or inactive) domain XML."""

    device: str
    """The target device (``vda``): libvirt's name for the disk in backups and checkpoints."""
    source: str
    """The image file or block device the disk reads."""
    source_type: str
    """``file`` or ``block`` (other kinds, such as network disks, are refused)."""
    format: str
    """Image format (``qcow2``, ``raw``...)."""
    size_bytes: int
    """Virtual size as the guest sees it."""
    bus: str
    read_only: bool
    alias: str
    """The device's id in QEMU (``virtio-disk0``), or "" when the domain is not running."""
    node_name: str
    """The format node libvirt gave the disk in QEMU (``libvirt-2-format``), or ""."""

    @property
    def qdev_path(self) -> str:
        """QOM path of the device's block backend (for HMP ``qemu-io -d``), or ""."""
        return f"/machine/peripheral/{self.alias}/virtio-backend" if self.alias else ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (for the snapshot's VM configuration)."""
        return asdict(self)


class LibvirtDomain:
    """A connection to libvirt and one domain on it, found by name or UUID.

    Use as a context manager, or call :meth:`close`. ``uri`` is any libvirt URI
    (``qemu:///system``, ``qemu+ssh://host/system``,
    ``qemu:///system?socket=/run/x/libvirt-sock``).
    """

    def __init__(self, name_or_uuid: str, *, uri: str = DEFAULT_LIBVIRT_URI) -> None:
        self.uri = uri
        with libvirt_errors(f"connecting to libvirt at {uri}"):
            self.connection: Any = libvirt_module().open(uri)
        try:
            self.domain: Any = self._lookup(name_or_uuid)
        except BaseException:
            self.close()
            raise
        self.name: str = self.domain.name()
        self.uuid: str = self.domain.UUIDString()

    def _lookup(self, name_or_uuid: str) -> Any:
        libvirt = libvirt_module()
        try:
            return self.connection.lookupByName(name_or_uuid)
        except libvirt.libvirtError:
            pass
        with contextlib.suppress(libvirt.libvirtError):
            return self.connection.lookupByUUIDString(name_or_uuid)
        raise SourceError(
            f"looking up the libvirt domain {name_or_uuid!r} at {self.uri} - no domain"
            " with that name or UUID"
        )

    def __enter__(self) -> LibvirtDomain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the libvirt connection (the domain keeps running)."""
        connection, self.connection = getattr(self, "connection", None), None
        if connection is not None:
            with contextlib.suppress(libvirt_module().libvirtError):
                connection.close()

    def what(self, operation: str) -> str:
        """``"<operation> of the libvirt domain 'NAME'"`` for messages."""
        return f"{operation} of the libvirt domain {self.name!r}"

    # -- state -----------------------------------------------------------------------------

    def is_active(self) -> bool:
        """Whether the domain runs (running or paused): only then it can be backed up live."""
        with libvirt_errors(self.what("reading the state")):
            return bool(self.domain.isActive())

    def xml(self) -> str:
        """The domain XML: live when the domain runs, the persistent definition otherwise."""
        with libvirt_errors(self.what("reading the XML")):
            return str(self.domain.XMLDesc(0))

    def has_guest_agent(self) -> bool:
        """Whether the domain has a qemu-guest-agent channel."""
        root = ET.fromstring(self.xml())
        return any(
            target.get("name") == _AGENT_CHANNEL
            for target in root.iterfind("./devices/channel/target")
        )

    def disks(self) -> list[DomainDisk]:
        """The domain's disks (CD-ROMs, floppies and LUNs are left out)."""
        root = ET.fromstring(self.xml())
        disks = []
        for element in root.iterfind("./devices/disk"):
            if element.get("device", "disk") != "disk":
                continue
            disks.append(self._disk(element))
        return disks

    def _disk(self, element: ET.Element) -> DomainDisk:
        target = element.find("target")
        device = target.get("dev", "") if target is not None else ""
        source_type = element.get("type", "file")
        source = element.find("source")
        path = ""
        if source is not None:
            path = source.get("file") or source.get("dev") or ""
        if source_type not in ("file", "block") or not path:
            raise SourceError(
                f"{self.what('reading the disks')} - disk {device!r} is of type"
                f" {source_type!r} without a local file or block device; not supported"
            )
        driver = element.find("driver")
        alias = element.find("alias")
        index = source.get("index") if source is not None else None
        with libvirt_errors(self.what(f"reading the size of disk {device}")):
            capacity = int(self.domain.blockInfo(device)[0])
        return DomainDisk(
            device=device,
            source=path,
            source_type=source_type,
            format=(driver.get("type") if driver is not None else None) or "raw",
            size_bytes=capacity,
            bus=target.get("bus", "") if target is not None else "",
            read_only=element.find("readonly") is not None,
            alias=(alias.get("name") if alias is not None else None) or "",
            node_name=f"libvirt-{index}-format" if index else "",
        )

    def config(self) -> dict[str, Any]:
        """The domain's configuration for the snapshot, as a JSON-able dict.

        ``domain_xml`` is the full domain XML (live when running); beside it the
        name, UUID, run state, libvirt and hypervisor versions and the disk layout.
        """
        xml = self.xml()
        with libvirt_errors(self.what("reading the configuration")):
            state, _reason = self.domain.state()
            versions = (self.connection.getLibVersion(), self.connection.getVersion())
        return {
            "hypervisor": "libvirt",
            "uri": self.uri,
            "name": self.name,
            "uuid": self.uuid,
            "state": _STATE_NAMES.get(state, str(state)),
            "libvirt_version": _version_text(versions[0]),
            "hypervisor_version": _version_text(versions[1]),
            "domain_xml": xml,
            "disks": [disk.to_json() for disk in self.disks()],
        }


_STATE_NAMES = {
    0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff",
    6: "crashed", 7: "pmsuspended",
}  # fmt: skip


def _version_text(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
