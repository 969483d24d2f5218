from __future__ import annotations

import stratavault.nbd
from stratavault.errors import EXIT_CODES, NbdError, NbdProtocolError, StratavaultError


def test_public_names_are_pinned() -> None:
    assert sorted(stratavault.nbd.__all__) == sorted(
        [
            "BASE_ALLOCATION", "NEED_DATA", "PAUSED", "BlockSizeInfo", "BlockStatusChunk",
            "ClientConnection", "ClientFlags", "ClientState", "DataChunk", "ErrorChunk", "Event",
            "ExportBackend", "ExportInfo", "ExportNameReply", "Extent", "FileBackend", "HoleChunk",
            "MetaContext", "NameInfo", "NbdAddress", "NbdClient", "NbdServer", "NoneChunk",
            "OptionAck", "OptionError", "OptionRequest", "Reply", "Request", "ServerConnection",
            "ServerEntry", "ServerGreeting", "ServerState", "SimpleReply", "UnknownInfo",
            "connect", "constants", "list_exports", "list_meta_contexts",
        ]
    )  # fmt: skip


def test_errors_have_their_exit_code() -> None:
    assert issubclass(NbdProtocolError, NbdError)
    assert issubclass(NbdError, StratavaultError) and issubclass(NbdError, OSError)
    assert NbdError.exit_code == NbdProtocolError.exit_code == 15 and 15 in EXIT_CODES


def test_addresses_parse() -> None:
    parse = stratavault.nbd.NbdAddress.parse
    assert parse("/run/a.sock").unix_path == "/run/a.sock"
    assert parse("unix:rel.sock").unix_path == "rel.sock"
    assert (parse("10.0.0.1:10810").host, parse("10.0.0.1:10810").port) == ("10.0.0.1", 10810)
    tcp = parse("nbd://example.org/my%20disk")
    assert (tcp.host, tcp.port, tcp.export) == ("example.org", 10809, "my disk")
    unix = parse("nbd+unix:///vda?socket=/tmp/x.sock")
    assert (unix.unix_path, unix.export) == ("/tmp/x.sock", "vda")
    assert parse("nbd+unix://?socket=/tmp/x.sock").export == ""
