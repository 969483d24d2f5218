"""Regression: a folder's listing must never be written before its files' chunk lists are in
it (a future counts as done before its callbacks run). Many incremental backups of large
changed files, each checked: every file's chunks add up to its size."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stratavault.jobs import BackupFilesOptions, backup_files
from stratavault.repo import KdfParams, Repository
from stratavault.snapshot import NodeType, walk_tree
from stratavault.storage import LocalStorage


def test_every_file_of_every_incremental_has_its_chunks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for i in range(24):
        folder = src / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}.bin").write_bytes(rng.bytes(5 << 19))
    files = sorted(src.rglob("*.bin"))
    storage = LocalStorage(tmp_path / "repo")
    with Repository.init(storage, b"pw", cache_dir=None, kdf=KdfParams.fast()) as repo:
        incomplete = []
        for round_ in range(15):
            for pick in rng.choice(len(files), 3, replace=False):
                new = files[pick].with_suffix(".new")
                new.write_bytes(rng.bytes(5 << 19))
                os.replace(new, files[pick])
            snap = backup_files(repo, BackupFilesOptions(paths=(src,), host="h"))
            assert snap.tree is not None
            for path, node in walk_tree(repo, snap.tree):
                if node.type == NodeType.FILE and sum(n for _, n in node.content) != node.size:
                    incomplete.append((round_, path))
    assert incomplete == []
