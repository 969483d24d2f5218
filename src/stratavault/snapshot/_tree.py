"""File trees: one serialized listing per directory, stored as a TREE blob.

A tree is a JSON document ``{"v": 1, "nodes": [...]}`` with nodes sorted by
name. Names are ``str`` made from the file system's bytes with
``surrogateescape``, so any name survives; they are encoded as UTF-8 with
``surrogateescape`` too. Binary values (xattrs) are base64. The encoding is
canonical: the same directory state always gives the same bytes, so an
unchanged directory yields the same tree id and is stored once.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from stratavault.errors import IntegrityError, UnsupportedFormatError
from stratavault.types import ChunkId, EntryType

__all__ = [
    "ContentRun",
    "Node",
    "NodeType",
    "TreeDocs",
    "content_runs",
    "decode_docs",
    "decode_tree",
    "encode_docs",
    "encode_tree",
    "same_listing",
    "tree_docs",
]

TREE_VERSION = 1


NodeType = EntryType
"""The kinds of node a tree holds: the file system's entry types."""

_NODE_TYPES = frozenset(EntryType)


ContentRun = tuple[ChunkId | None, int]
"""A piece of file content: ``(chunk id, length)``, or ``(None, length)`` for a hole."""


@dataclass(slots=True)
class Node:
    """One entry of a directory as it was at backup time."""

    name: str
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    inode: int = 0
    dev: int = 0
    nlink: int = 1
    rdev: int = 0
    link_target: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    content: list[ContentRun] = field(default_factory=list)
    subtree: ChunkId | None = None
    error: str | None = None
    """Set when the entry could not be read completely; its content is then partial."""

    def to_json(self) -> dict[str, Any]:
        """Return the canonical JSON form (defaults omitted)."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "user": self.user,
            "group": self.group,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "atime_ns": self.atime_ns,
            "ctime_ns": self.ctime_ns,
            "inode": self.inode,
            "dev": self.dev,
            "nlink": self.nlink,
        }
        if self.rdev:
            out["rdev"] = self.rdev
        if self.link_target is not None:
            out["link_target"] = self.link_target
        if self.xattrs:
            out["xattrs"] = {
                k: base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())
            }
        if self.type == NodeType.FILE:
            out["content"] = [[cid.hex() if cid else None, n] for cid, n in self.content]
        if self.subtree is not None:
            out["subtree"] = self.subtree.hex()
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Node:
        """Build a node from its JSON form; raise ``IntegrityError`` on malformed input."""
        try:
            get = doc.get
            xattrs = get("xattrs")
            content = get("content")
            sub = get("subtree")
            node = cls(
                name=str(doc["name"]),
                type=str(doc["type"]),
                mode=int(doc["mode"]),
                uid=int(get("uid", 0)),
                gid=int(get("gid", 0)),
                user=str(get("user", "")),
                group=str(get("group", "")),
                size=int(get("size", 0)),
                mtime_ns=int(get("mtime_ns", 0)),
                atime_ns=int(get("atime_ns", 0)),
                ctime_ns=int(get("ctime_ns", 0)),
                inode=int(get("inode", 0)),
                dev=int(get("dev", 0)),
                nlink=int(get("nlink", 1)),
                rdev=int(get("rdev", 0)),
                link_target=get("link_target"),
                xattrs={k: base64.b64decode(v) for k, v in xattrs.items()} if xattrs else {},
                content=[
                    (ChunkId(bytes.fromhex(cid)) if cid else None, int(n)) for cid, n in content
                ]
                if content
                else [],
                subtree=ChunkId(bytes.fromhex(sub)) if sub else None,
                error=get("error"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed tree node {doc!r:.80}: {exc}") from exc
        if node.type not in _NODE_TYPES:
            raise IntegrityError(f"tree node {node.name!r} has unknown type {node.type!r}")
        return node


def content_runs(doc: dict[str, Any]) -> list[ContentRun]:
    """The content runs of a file node given in its JSON form."""
    return [(ChunkId(bytes.fromhex(cid)) if cid else None, int(n)) for cid, n in doc["content"]]


TreeDocs = list[dict[str, Any]]
"""A directory listing in its JSON form: node documents sorted by name."""


def tree_docs(nodes: list[Node]) -> TreeDocs:
    """The canonical JSON form of a listing (sorted by the bytes of the names)."""
    return [n.to_json() for n in _ordered(nodes)]


def same_listing(nodes: list[Node], docs: TreeDocs) -> bool:
    """Whether ``tree_docs(nodes) == docs``, comparing one node at a time (the JSON form of
    a folder of thousands of files is not built to be compared)."""
    return len(nodes) == len(docs) and all(
        node.to_json() == doc for node, doc in zip(_ordered(nodes), docs, strict=True)
    )


def _ordered(nodes: list[Node]) -> list[Node]:
    return sorted(nodes, key=lambda n: n.name.encode("utf-8", "surrogateescape"))


def encode_docs(docs: TreeDocs) -> bytes:
    """Serialize a listing given in its JSON form."""
    text = json.dumps({"v": TREE_VERSION, "nodes": docs}, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogateescape")


def encode_tree(nodes: list[Node]) -> bytes:
    """Serialize a directory listing canonically (nodes sorted by name): the bytes of
    ``encode_docs(tree_docs(nodes))``, one node at a time (a folder of thousands of files
    does not hold the JSON form of them all, and then a text copy, at once)."""
    head = json.dumps({"v": TREE_VERSION, "nodes": []}, separators=(",", ":"))
    out = bytearray(head[:-2].encode())
    for number, node in enumerate(_ordered(nodes)):
        text = json.dumps(node.to_json(), separators=(",", ":"), ensure_ascii=False)
        out += b"," if number else b""
        out += text.encode("utf-8", "surrogateescape")
    out += b"]}"
    return bytes(out)


def decode_docs(data: bytes, *, where: str = "tree") -> TreeDocs:
    """Parse a serialized listing into its JSON form; ``where`` names it in errors."""
    try:
        doc = json.loads(data.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise IntegrityError(f"{where}: not a valid tree: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise IntegrityError(f"{where}: not a valid tree")
    if doc.get("v") != TREE_VERSION:
        raise UnsupportedFormatError(f"{where}: tree format version {doc.get('v')!r} is unknown")
    nodes: TreeDocs = doc["nodes"]
    if not all(isinstance(n, dict) for n in nodes):
        raise IntegrityError(f"{where}: not a valid tree")
    return nodes


def decode_tree(data: bytes, *, where: str = "tree") -> list[Node]:
    """Parse a serialized directory listing; ``where`` names it in errors."""
    return [Node.from_json(n) for n in decode_docs(data, where=where)]
