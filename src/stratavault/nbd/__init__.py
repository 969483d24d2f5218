"""The NBD protocol (Network Block Device): a sans-I/O core, a blocking client and a server.

The client reads and writes disks that QEMU, qemu-nbd or qemu-storage-daemon export, with
block status for ``base:allocation`` and ``qemu:dirty-bitmap:NAME``; the server exports any
:class:`ExportBackend` to qemu-img, nbdinfo or QEMU. See docs/nbd.md.
"""

from __future__ import annotations

from stratavault.nbd import _constants as constants
from stratavault.nbd._address import NbdAddress
from stratavault.nbd._backend import ExportBackend, FileBackend
from stratavault.nbd._client import Extent, NbdClient
from stratavault.nbd._connect import connect, list_exports, list_meta_contexts
from stratavault.nbd._events import (
    NEED_DATA,
    PAUSED,
    BlockSizeInfo,
    BlockStatusChunk,
    ClientFlags,
    DataChunk,
    ErrorChunk,
    Event,
    ExportInfo,
    ExportNameReply,
    HoleChunk,
    MetaContext,
    NameInfo,
    NoneChunk,
    OptionAck,
    OptionError,
    OptionRequest,
    Reply,
    Request,
    ServerEntry,
    ServerGreeting,
    SimpleReply,
    UnknownInfo,
)
from stratavault.nbd._protocol import ClientConnection, ClientState
from stratavault.nbd._server import NbdServer
from stratavault.nbd._server_protocol import ServerConnection, ServerState

BASE_ALLOCATION = constants.CONTEXT_BASE_ALLOCATION
"""The name of the allocation metadata context."""

__all__ = [
    "BASE_ALLOCATION",
    "NEED_DATA",
    "PAUSED",
    "BlockSizeInfo",
    "BlockStatusChunk",
    "ClientConnection",
    "ClientFlags",
    "ClientState",
    "DataChunk",
    "ErrorChunk",
    "Event",
    "ExportBackend",
    "ExportInfo",
    "ExportNameReply",
    "Extent",
    "FileBackend",
    "HoleChunk",
    "MetaContext",
    "NameInfo",
    "NbdAddress",
    "NbdClient",
    "NbdServer",
    "NoneChunk",
    "OptionAck",
    "OptionError",
    "OptionRequest",
    "Reply",
    "Request",
    "ServerConnection",
    "ServerEntry",
    "ServerGreeting",
    "ServerState",
    "SimpleReply",
    "UnknownInfo",
    "connect",
    "constants",
    "list_exports",
    "list_meta_contexts",
]
