"""Numpy record layouts of the format (kept beside ``_formats``; do not modify)."""

from __future__ import annotations

from typing import Final

import numpy as np

HEADER_ENTRY: Final = np.dtype(
    [("kind", "u1"), ("id", "S32"), ("offset", "<u4"), ("stored", "<u4"), ("raw", "<u4")]
)
"""One blob in a pack header: 45 bytes."""

INDEX_ENTRY: Final = np.dtype(
    [
        ("pack", "<u4"),
        ("kind", "u1"),
        ("id", "S32"),
        ("offset", "<u4"),
        ("stored", "<u4"),
        ("raw", "<u4"),
    ]
)
"""One blob in an index object (``pack`` numbers the object's own pack table): 49 bytes.

The same layout is the client's in-memory and cached chunk index, where ``pack``
numbers the client's pack list.
"""
