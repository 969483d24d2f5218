"""Folder listings: the streamed encoding is byte for byte the canonical one."""

from __future__ import annotations

import os
import random

from stratavault.snapshot import Node, NodeType
from stratavault.snapshot._tree import (
    decode_tree,
    encode_docs,
    encode_tree,
    same_listing,
    tree_docs,
)
from stratavault.types import ChunkId

NAMES = ["a", "B", "zz", "é", "日本", "\udcff-raw", "x" * 200, "with,comma", 'quo"te', "tab\t"]


def _node(rng: random.Random, name: str) -> Node:
    kind = rng.choice([NodeType.FILE, NodeType.DIR, NodeType.SYMLINK])
    node = Node(name=name, type=kind, mode=rng.randrange(0o7777), size=rng.randrange(1 << 40))
    node.mtime_ns = rng.randrange(1 << 62)
    if kind == NodeType.FILE:
        node.content = [(ChunkId(os.urandom(32)), 1000), (None, 5)]
    if kind == NodeType.SYMLINK:
        node.link_target = "../" + name
    if rng.random() < 0.3:
        node.xattrs = {"user.a": os.urandom(7)}
        node.error = "cannot read: reasons"
    return node


def test_streamed_tree_encoding_is_the_canonical_one() -> None:
    rng = random.Random(5)
    for size in (0, 1, 2, 10, 300):
        names = [f"{rng.choice(NAMES)}-{i}" for i in range(size)]
        nodes = [_node(rng, n) for n in names]
        data = encode_tree(nodes)
        assert data == encode_docs(tree_docs(nodes))
        assert [n.name for n in decode_tree(data)] == sorted(
            names, key=lambda s: s.encode("utf-8", "surrogateescape")
        )


def test_same_listing_compares_as_the_json_forms() -> None:
    rng = random.Random(9)
    nodes = [_node(rng, f"n{i}") for i in range(50)]
    docs = tree_docs(nodes)
    assert same_listing(list(reversed(nodes)), docs)  # the order of the nodes is the name's
    assert not same_listing(nodes[:-1], docs)
    assert not same_listing(nodes, docs[:-1])
    nodes[7].mtime_ns += 1
    assert not same_listing(nodes, docs)
    assert same_listing([], [])
