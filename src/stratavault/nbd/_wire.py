"""Byte-level helpers shared by the NBD state machines: a receive buffer and the encoders."""

from __future__ import annotations

import struct

from stratavault.errors import NbdProtocolError
from stratavault.nbd import _constants as c

OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length


class ReceiveBuffer:
    """Bytes received but not yet parsed."""

    def __init__(self) -> None:
        self._data = bytearray()

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._data += data

    def peek(self, n: int) -> bytes | None:
        """The first ``n`` bytes without consuming them, or None when fewer are there."""
        if len(self._data) < n:
            return None
        return bytes(self._data[:n])

    def take(self, n: int) -> bytes | None:
        """Consume and return the first ``n`` bytes, or None when fewer are there."""
        if len(self._data) < n:
            return None
        if n == len(self._data):
            out = bytes(self._data)
            self._data.clear()
            return out
        with memoryview(self._data) as view:
            out = bytes(view[:n])
        del self._data[:n]
        return out


def decode_string(raw: bytes, what: str) -> str:
    """A protocol string (UTF-8, no NUL, at most 4096 bytes) or a protocol error naming ``what``."""
    if len(raw) > c.MAX_STRING:
        raise NbdProtocolError(f"NBD {what}: string of {len(raw)} bytes is longer than 4096")
    if b"\0" in raw:
        raise NbdProtocolError(f"NBD {what}: string contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NbdProtocolError(f"NBD {what}: string is not UTF-8 ({exc.reason})") from None


def encode_string(text: str, what: str) -> bytes:
    """A string for the wire, refused when longer than the protocol allows."""
    raw = text.encode("utf-8")
    if len(raw) > c.MAX_STRING or b"\0" in raw:
        raise NbdProtocolError(f"NBD {what}: {text[:40]!r}... is too long or contains NUL")
    return raw


def u32_string(text: str, what: str) -> bytes:
    """A string preceded by its 32-bit length."""
    raw = encode_string(text, what)
    return struct.pack(">I", len(raw)) + raw


def split_u32_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    """Parse a 32-bit length and a string at ``pos``; return it and the position after."""
    if pos + 4 > len(data):
        raise NbdProtocolError(f"NBD {what}: truncated before a string length")
    (n,) = struct.unpack_from(">I", data, pos)
    if pos + 4 + n > len(data):
        raise NbdProtocolError(f"NBD {what}: string of {n} bytes runs past the end of the data")
    return decode_string(data[pos + 4 : pos + 4 + n], what), pos + 4 + n


def option(opt: int, data: bytes = b"") -> bytes:
    """An option sent by the client."""
    return OPTION_HEADER.pack(c.IHAVEOPT, opt, len(data)) + data


def option_reply(opt: int, reply_type: int, data: bytes = b"") -> bytes:
    """An option reply sent by the server."""
    return OPTION_REPLY_HEADER.pack(c.OPTION_REPLY_MAGIC, opt, reply_type, len(data)) + data


def error_name(error: int) -> str:
    """A readable name of an NBD error number."""
    return c.ERROR_NAMES.get(error, f"error {error}")


def option_name(opt: int) -> str:
    """A readable name of an option number."""
    for name, value in vars(c).items():
        if name.startswith("OPT_") and value == opt:
            return "NBD_" + name
    return f"option {opt}"
