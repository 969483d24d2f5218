"""What a running QEMU (or qemu-storage-daemon) tells about its disks and configuration."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stratavault.errors import SourceError
from stratavault.sources._qmp import QmpSession

__all__ = ["DirtyBitmap", "VmDisk", "disk_by_node", "list_vm_disks", "vm_config"]

_FILTER_DRIVERS = frozenset(
    {"throttle", "copy-on-read", "preallocate", "compress", "blkdebug", "copy-before-write"}
)
"""Drivers of filter nodes that sit above a disk's format node (a running backup adds one)."""


@dataclass(frozen=True)
class DirtyBitmap:
    """A dirty bitmap of a block node, as QEMU reports it."""

    name: str
    node: str
    count_bytes: int
    """Bytes marked dirty."""
    granularity_bytes: int
    recording: bool
    persistent: bool
    inconsistent: bool
    """Left over from an unclean QEMU exit: unusable, can only be removed."""
    busy: bool
    """In use by an export or a job; cannot be changed now."""


@dataclass(frozen=True)
class VmDisk:
    """One disk of a VM: its guest device and the format node QEMU reads it through."""

    device: str
    """The guest device's id (``vda``), or its QOM path when it has no id."""
    qdev_path: str
    """QOM path of the device's block backend (for HMP ``qemu-io -d``), or "" when none."""
    node_name: str
    """The format node (qcow2, raw...) the device is attached to."""
    filename: str
    format: str
    virtual_size_bytes: int
    read_only: bool
    bitmaps: tuple[DirtyBitmap, ...]
    """Named dirty bitmaps on the format node."""

    def bitmap(self, name: str) -> DirtyBitmap | None:
        """The bitmap called ``name`` on this disk, if there is one."""
        return next((b for b in self.bitmaps if b.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (for the snapshot's VM configuration)."""
        return asdict(self)


def list_vm_disks(session: QmpSession) -> list[VmDisk]:
    """The VM's disks (removable media without a medium and CD-ROMs are left out).

    With qemu-storage-daemon there are no guest devices: every node that no
    other node uses as its child is listed, ``device`` being its node name.
    """
    nodes = {n["node-name"]: n for n in session.execute("query-named-block-nodes", {"flat": True})}
    graph: dict[str, str] | None = None
    disks: list[VmDisk] = []
    for entry in session.execute("query-block"):
        inserted = entry.get("inserted")
        if inserted is None or entry.get("removable"):
            continue
        qdev = str(entry.get("qdev") or "")
        device = entry.get("device") or _device_id(qdev)
        node = nodes[inserted["node-name"]]
        while node["drv"] in _FILTER_DRIVERS:
            graph = _filter_children(session) if graph is None else graph
            if node["node-name"] not in graph:
                raise SourceError(
                    f"reading the disk layout of {device} - no child below filter node"
                    f" {node['node-name']!r}"
                )
            node = nodes[graph[node["node-name"]]]
        disks.append(_disk(device, qdev, node))
    return disks


def _filter_children(session: QmpSession) -> dict[str, str]:
    """Node name -> node name of its ``file`` child, from the block graph."""
    graph = session.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"] if n["type"] == "block-driver"}
    return {
        names[e["parent"]]: names[e["child"]]
        for e in graph["edges"]
        if e["name"] == "file" and e["parent"] in names and e["child"] in names
    }


def disk_by_node(session: QmpSession, node_name: str) -> VmDisk:
    """The block node ``node_name`` described as a disk (for qemu-storage-daemon)."""
    nodes = {n["node-name"]: n for n in session.execute("query-named-block-nodes", {"flat": True})}
    if node_name not in nodes:
        raise SourceError(f"looking up block node {node_name!r} on {session.socket_path} - absent")
    return _disk(node_name, "", nodes[node_name])


def _device_id(qdev: str) -> str:
    parts = [p for p in qdev.split("/") if p]
    if len(parts) >= 3 and parts[:2] == ["machine", "peripheral"]:
        return parts[2]
    return qdev


def _disk(device: str, qdev: str, node: dict[str, Any]) -> VmDisk:
    name = node["node-name"]
    bitmaps = tuple(
        DirtyBitmap(
            name=b["name"],
            node=name,
            count_bytes=int(b.get("count", 0)),
            granularity_bytes=int(b.get("granularity", 0)),
            recording=bool(b.get("recording", False)),
            persistent=bool(b.get("persistent", False)),
            inconsistent=bool(b.get("inconsistent", False)),
            busy=bool(b.get("busy", False)),
        )
        for b in node.get("dirty-bitmaps") or []
        if b.get("name")  # unnamed bitmaps belong to running jobs
    )
    image = node.get("image") or {}
    return VmDisk(
        device=device,
        qdev_path=qdev,
        node_name=name,
        filename=str(image.get("filename") or node.get("file") or ""),
        format=str(node["drv"]),
        virtual_size_bytes=int(image.get("virtual-size", 0)),
        read_only=bool(node.get("ro", False)),
        bitmaps=bitmaps,
    )


def vm_config(session: QmpSession) -> dict[str, Any]:
    """The VM's configuration for the snapshot, as a JSON-able dict.

    Holds the QEMU command line (from ``/proc/PID/cmdline`` of the process at the
    other end of the QMP socket, when readable), what QMP reports (version, name,
    UUID, memory, CPUs, status) and the disk layout.
    """
    config: dict[str, Any] = {"hypervisor": "qemu"}
    version = session.greeting.get("QMP", {}).get("version", {})
    qemu = version.get("qemu", {})
    config["qemu_version"] = f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}"
    config["qemu_package"] = version.get("package", "")
    config["pid"] = session.peer_pid
    config["argv"] = _cmdline(session.peer_pid)
    config["name"] = _optional(session, "query-name").get("name")
    config["uuid"] = _optional(session, "query-uuid").get("UUID")
    config["status"] = _optional(session, "query-status").get("status")
    memory = _optional(session, "query-memory-size-summary")
    config["memory_bytes"] = memory.get("base-memory")
    cpus = _optional(session, "query-cpus-fast", default=[])
    config["cpus"] = len(cpus) if isinstance(cpus, list) else None
    config["disks"] = [disk.to_json() for disk in list_vm_disks(session)]
    return config


def _optional(session: QmpSession, command: str, default: Any = None) -> Any:
    """A query that some QEMU builds (or qemu-storage-daemon) do not have."""
    try:
        return session.execute(command)
    except SourceError:
        return {} if default is None else default


def _cmdline(pid: int | None) -> list[str] | None:
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]] or None
