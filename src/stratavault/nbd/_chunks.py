"""Structured reply chunks: parsing (client side) and encoding (server side)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from stratavault.errors import NbdProtocolError
from stratavault.nbd import _constants as c, _events as ev, _wire as w


def parse_chunk(
    rtype: int, handle: int, done: bool, data: bytes, command: int, offset: int, length: int
) -> ev.Reply:
    """The event for one structured chunk of the reply to a request (command, offset, length)."""
    what = f"NBD structured reply {handle:#x}"
    if rtype == c.REPLY_TYPE_NONE:
        if data or not done:
            raise NbdProtocolError(f"{what}: NBD_REPLY_TYPE_NONE without DONE or with a payload")
        return ev.NoneChunk(handle, done)
    if rtype in (c.REPLY_TYPE_ERROR, c.REPLY_TYPE_ERROR_OFFSET):
        return _parse_error(rtype, handle, done, data, what)
    if rtype in (c.REPLY_TYPE_OFFSET_DATA, c.REPLY_TYPE_OFFSET_HOLE):
        if command != c.CMD_READ:
            raise NbdProtocolError(f"{what}: read data chunk in the reply to command {command}")
        return _parse_read_chunk(rtype, handle, done, data, offset, length, what)
    if rtype == c.REPLY_TYPE_BLOCK_STATUS:
        if command != c.CMD_BLOCK_STATUS:
            raise NbdProtocolError(f"{what}: block status chunk in the reply to command {command}")
        if len(data) < 12 or (len(data) - 4) % 8:
            raise NbdProtocolError(f"{what}: block status payload of {len(data)} bytes is bad")
        (ctx_id,) = struct.unpack_from(">I", data)
        values = struct.unpack_from(f">{(len(data) - 4) // 4}I", data, 4)
        extents = tuple(zip(values[0::2], values[1::2], strict=True))
        if any(n == 0 for n, _ in extents):
            raise NbdProtocolError(f"{what}: block status extent of length 0")
        return ev.BlockStatusChunk(handle, done, ctx_id, extents)
    raise NbdProtocolError(f"{what}: unknown chunk type {rtype}")


def _parse_error(rtype: int, handle: int, done: bool, data: bytes, what: str) -> ev.ErrorChunk:
    if len(data) < 6:
        raise NbdProtocolError(f"{what}: error chunk of {len(data)} bytes is truncated")
    error, msg_len = struct.unpack_from(">IH", data)
    tail = 8 if rtype == c.REPLY_TYPE_ERROR_OFFSET else 0
    if 6 + msg_len + tail != len(data):
        raise NbdProtocolError(f"{what}: error chunk message length {msg_len} does not fit")
    message = data[6 : 6 + msg_len].decode("utf-8", "replace")
    err_offset = struct.unpack_from(">Q", data, 6 + msg_len)[0] if tail else None
    if error == 0:
        raise NbdProtocolError(f"{what}: error chunk with error number 0")
    return ev.ErrorChunk(handle, done, error, message, err_offset)


def _parse_read_chunk(
    rtype: int, handle: int, done: bool, data: bytes, offset: int, length: int, what: str
) -> ev.Reply:
    if rtype == c.REPLY_TYPE_OFFSET_DATA:
        if len(data) < 9:
            raise NbdProtocolError(f"{what}: data chunk of {len(data)} bytes is truncated")
        (at,) = struct.unpack_from(">Q", data)
        size = len(data) - 8
        chunk: ev.Reply = ev.DataChunk(handle, done, at, data[8:])
    else:
        if len(data) != 12:
            raise NbdProtocolError(f"{what}: hole chunk of {len(data)} bytes, not 12")
        at, size = struct.unpack(">QI", data)
        chunk = ev.HoleChunk(handle, done, at, size)
    if size == 0 or at < offset or at + size > offset + length:
        raise NbdProtocolError(
            f"{what}: chunk [{at}, +{size}) lies outside the request [{offset}, +{length})"
        )
    return chunk


def chunk_header(handle: int, rtype: int, length: int, *, done: bool) -> bytes:
    """The header of a structured reply chunk whose payload is ``length`` bytes."""
    flags = c.REPLY_FLAG_DONE if done else 0
    return w.STRUCTURED_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, flags, rtype, handle, length)


def data_chunk_header(handle: int, offset: int, size: int, *, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``size`` bytes of data must follow it."""
    return chunk_header(handle, c.REPLY_TYPE_OFFSET_DATA, 8 + size, done=done) + struct.pack(
        ">Q", offset
    )


def hole_chunk(handle: int, offset: int, size: int, *, done: bool) -> bytes:
    """An OFFSET_HOLE chunk: ``size`` zero bytes at ``offset``."""
    header = chunk_header(handle, c.REPLY_TYPE_OFFSET_HOLE, 12, done=done)
    return header + struct.pack(">QI", offset, size)


def block_status_chunk(
    handle: int, context_id: int, extents: Iterable[tuple[int, int]], *, done: bool
) -> bytes:
    """A BLOCK_STATUS chunk of extents ``(length, flags)`` for one context."""
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    if len(body) < 12:
        raise NbdProtocolError("NBD block status reply: at least one extent is required")
    return chunk_header(handle, c.REPLY_TYPE_BLOCK_STATUS, len(body), done=done) + body


def error_chunk(
    handle: int, error: int, message: str, *, offset: int | None = None, done: bool = True
) -> bytes:
    """An ERROR (or ERROR_OFFSET when ``offset`` is given) chunk."""
    raw = message.encode("utf-8")[:1024]
    body = struct.pack(">IH", error, len(raw)) + raw
    rtype = c.REPLY_TYPE_ERROR
    if offset is not None:
        body += struct.pack(">Q", offset)
        rtype = c.REPLY_TYPE_ERROR_OFFSET
    return chunk_header(handle, rtype, len(body), done=done) + body


def none_chunk(handle: int) -> bytes:
    """A NONE chunk with DONE: the end of a structured reply."""
    return chunk_header(handle, c.REPLY_TYPE_NONE, 0, done=True)
