"""Opening NBD client connections: the handshake over a socket."""

from __future__ import annotations

import os
from collections.abc import Sequence

from stratavault.errors import NbdError, NbdProtocolError
from stratavault.nbd import _constants as c, _events as ev
from stratavault.nbd._address import NbdAddress
from stratavault.nbd._client import NbdClient, first_event, negotiate_events
from stratavault.nbd._protocol import ClientConnection, ClientState
from stratavault.nbd._wire import option_name


class _Handshake:
    def __init__(self, address: NbdAddress, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.sock = address.connect(timeout_s)
        self.conn = ClientConnection()
        try:
            greeting = first_event(self.sock, self.conn, self.silent)
            assert isinstance(greeting, ev.ServerGreeting)
            self.sock.sendall(self.conn.send_client_flags())
        except BaseException:
            self.sock.close()
            raise

    def silent(self) -> NbdError:
        return NbdError(
            f"NBD handshake with {self.address}: server sent nothing for {self.timeout_s} s"
        )

    def option(self, data: bytes) -> list[ev.Event]:
        return negotiate_events(self.sock, self.conn, data, self.silent)

    def close(self) -> None:
        try:
            if self.conn.state is ClientState.OPTIONS:
                self.sock.sendall(self.conn.send_abort())
        except OSError:
            pass
        self.sock.close()


def _final_error(events: list[ev.Event], what: str) -> None:
    final = events[-1]
    if isinstance(final, ev.OptionError):
        name = option_name(final.option)
        code = final.reply_type & 0xFF
        raise NbdError(f"{what}: server refused {name} (error {code}): {final.message}")


def connect(
    address: str | os.PathLike[str] | NbdAddress,
    export: str | None = None,
    *,
    meta_contexts: Sequence[str] = (),
    timeout_s: float = 30.0,
    in_flight: int = 32,
    request_bytes: int = 512 * 1024,
    structured_replies: bool = True,
) -> NbdClient:
    """Open export ``export`` (or the URI's, or "") at ``address`` and negotiate structured
    replies and the ``meta_contexts`` (such as ``base:allocation``, ``qemu:dirty-bitmap:NAME``)
    that the server knows; ``NbdClient.contexts`` says which it agreed to.

    ``in_flight`` requests of ``request_bytes`` each are kept outstanding when reading or
    writing; ``timeout_s`` bounds every wait for the server."""
    addr = address if isinstance(address, NbdAddress) else NbdAddress.parse(address)
    name = export if export is not None else (addr.export or "")
    what = f"opening NBD export {name!r} at {addr}"
    hs = _Handshake(addr, timeout_s)
    try:
        if structured_replies:
            hs.option(hs.conn.send_option(c.OPT_STRUCTURED_REPLY))
        contexts: dict[str, int] = {}
        if meta_contexts and hs.conn.structured_replies:
            events = hs.option(hs.conn.send_meta_context(name, list(meta_contexts), list_=False))
            final = events[-1]
            if not (isinstance(final, ev.OptionError) and final.reply_type == c.REP_ERR_UNSUP):
                _final_error(events, what)  # a server without meta contexts: none agreed
            contexts = {e.name: e.context_id for e in events if isinstance(e, ev.MetaContext)}
        events = hs.option(hs.conn.send_go(name))
        _final_error(events, what)
        infos = [e for e in events if isinstance(e, ev.ExportInfo)]
        if not infos:
            raise NbdProtocolError(f"{what}: the server sent no NBD_INFO_EXPORT")
        sizes = [e for e in events if isinstance(e, ev.BlockSizeInfo)]
        block_sizes = (sizes[-1].minimum, sizes[-1].preferred, sizes[-1].maximum) if sizes else None
    except BaseException:
        hs.close()
        raise
    return NbdClient(
        hs.sock,
        hs.conn,
        export=name,
        address=str(addr),
        size_bytes=infos[-1].size_bytes,
        transmission_flags=infos[-1].transmission_flags,
        block_sizes=block_sizes,
        contexts=contexts,
        timeout_s=timeout_s,
        in_flight=in_flight,
        request_bytes=request_bytes,
    )


def list_exports(
    address: str | os.PathLike[str] | NbdAddress, *, timeout_s: float = 30.0
) -> list[tuple[str, str]]:
    """The (name, description) of every export the server lists (NBD_OPT_LIST)."""
    addr = address if isinstance(address, NbdAddress) else NbdAddress.parse(address)
    hs = _Handshake(addr, timeout_s)
    try:
        events = hs.option(hs.conn.send_option(c.OPT_LIST))
        _final_error(events, f"listing NBD exports at {addr}")
        return [(e.name, e.description) for e in events if isinstance(e, ev.ServerEntry)]
    finally:
        hs.close()


def list_meta_contexts(
    address: str | os.PathLike[str] | NbdAddress,
    export: str | None = None,
    queries: Sequence[str] = (),
    *,
    timeout_s: float = 30.0,
) -> list[str]:
    """The metadata contexts the server offers on an export (NBD_OPT_LIST_META_CONTEXT)."""
    addr = address if isinstance(address, NbdAddress) else NbdAddress.parse(address)
    name = export if export is not None else (addr.export or "")
    hs = _Handshake(addr, timeout_s)
    try:
        hs.option(hs.conn.send_option(c.OPT_STRUCTURED_REPLY))
        events = hs.option(hs.conn.send_meta_context(name, list(queries), list_=True))
        _final_error(events, f"listing NBD meta contexts of {name!r} at {addr}")
        return [e.name for e in events if isinstance(e, ev.MetaContext)]
    finally:
        hs.close()


__all__ = ["connect", "list_exports", "list_meta_contexts"]
