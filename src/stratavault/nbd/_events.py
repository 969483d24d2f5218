"""Events that the NBD state machines produce from received bytes (see ``_protocol``)."""

from __future__ import annotations

from dataclasses import dataclass, field


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""More bytes must be received before the next event can be produced."""

PAUSED = _Sentinel("PAUSED")
"""The machine waits for its owner to answer the last event (an option) before parsing more."""


class Event:
    """Base of all events."""


# -- handshake, seen by the client ---------------------------------------------------------------
@dataclass(frozen=True)
class ServerGreeting(Event):
    """The server's greeting: its handshake flags."""

    handshake_flags: int


@dataclass(frozen=True)
class ExportInfo(Event):
    """NBD_INFO_EXPORT: the size and transmission flags of the export being negotiated."""

    size_bytes: int
    transmission_flags: int


@dataclass(frozen=True)
class BlockSizeInfo(Event):
    """NBD_INFO_BLOCK_SIZE: the server's minimum, preferred and maximum block sizes."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True)
class NameInfo(Event):
    """NBD_INFO_NAME or NBD_INFO_DESCRIPTION (``kind`` says which)."""

    kind: int
    text: str


@dataclass(frozen=True)
class UnknownInfo(Event):
    """An NBD_REP_INFO of a type this code does not know (to be ignored)."""

    info_type: int
    data: bytes


@dataclass(frozen=True)
class ServerEntry(Event):
    """One NBD_REP_SERVER reply to NBD_OPT_LIST: an export name and its description."""

    name: str
    description: str


@dataclass(frozen=True)
class MetaContext(Event):
    """One NBD_REP_META_CONTEXT: a context the server agreed to (its id) or lists."""

    context_id: int
    name: str


@dataclass(frozen=True)
class OptionAck(Event):
    """NBD_REP_ACK: the final, successful reply to an option."""

    option: int


@dataclass(frozen=True)
class OptionError(Event):
    """An NBD_REP_ERR_* final reply to an option, with the server's message."""

    option: int
    reply_type: int
    message: str


@dataclass(frozen=True)
class ExportNameReply(Event):
    """The reply to NBD_OPT_EXPORT_NAME: size and flags; transmission follows."""

    size_bytes: int
    transmission_flags: int


# -- handshake, seen by the server ---------------------------------------------------------------
@dataclass(frozen=True)
class ClientFlags(Event):
    """The client's flags, which ended the greeting."""

    flags: int


@dataclass(frozen=True)
class OptionRequest(Event):
    """An option from the client; ``option`` is the NBD_OPT_* number.

    For NBD_OPT_GO, NBD_OPT_INFO and NBD_OPT_EXPORT_NAME ``export_name`` and ``info_requests``
    are filled; for the META_CONTEXT options ``export_name`` and ``queries``; an unknown option
    keeps its raw ``data``.
    """

    option: int
    export_name: str = ""
    info_requests: tuple[int, ...] = ()
    queries: tuple[str, ...] = ()
    data: bytes = b""


# -- transmission --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request(Event):
    """A transmission request from the client (``data`` holds a write's payload)."""

    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True)
class Reply(Event):
    """Base of reply events seen by the client; ``done`` ends the request ``handle``."""

    handle: int
    done: bool


@dataclass(frozen=True)
class SimpleReply(Reply):
    """A simple reply: an error number (0 for success) and, for a read, the data."""

    error: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class DataChunk(Reply):
    """NBD_REPLY_TYPE_OFFSET_DATA: ``data`` read at ``offset``."""

    offset: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class HoleChunk(Reply):
    """NBD_REPLY_TYPE_OFFSET_HOLE: ``length`` zero bytes at ``offset``."""

    offset: int = 0
    length: int = 0


@dataclass(frozen=True)
class BlockStatusChunk(Reply):
    """NBD_REPLY_TYPE_BLOCK_STATUS: extents ``(length, flags)`` of one context from the offset."""

    context_id: int = 0
    extents: tuple[tuple[int, int], ...] = field(default=())


@dataclass(frozen=True)
class ErrorChunk(Reply):
    """NBD_REPLY_TYPE_ERROR or _ERROR_OFFSET (then ``offset`` is not None)."""

    error: int = 0
    message: str = ""
    offset: int | None = None


@dataclass(frozen=True)
class NoneChunk(Reply):
    """NBD_REPLY_TYPE_NONE: nothing more (only with ``done``)."""
