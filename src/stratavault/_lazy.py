"""Lazy package exports: a package's public names are imported when first used.

A package ``__init__`` lists its exports once, in an ``if TYPE_CHECKING:`` block of
``from stratavault.pkg._module import Name as Name`` lines (what type checkers and the
import-linter contract read), and ends with::

    __all__, __getattr__ = lazy_exports(__name__, __file__)

At run time nothing more is imported until a name is used, so a process that needs one
module of a package (a backup's worker process needs chunking and encryption, not numpy,
the S3 client or the QMP client) does not pay for the others, and every command starts
faster.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["lazy_exports"]


def _exports(init_file: str, package: str) -> dict[str, str]:
    """``name -> module`` from the ``if TYPE_CHECKING:`` imports of a package ``__init__``."""
    tree = ast.parse(Path(init_file).read_text(encoding="utf-8"), init_file)
    found: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"):
            continue
        for statement in node.body:
            if isinstance(statement, ast.ImportFrom) and (statement.module or "").startswith(
                package + "."
            ):
                for alias in statement.names:
                    found[alias.asname or alias.name] = str(statement.module)
    return found


def lazy_exports(package: str, init_file: str) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package``, whose exports are the names its
    ``__init__`` imports under ``if TYPE_CHECKING:``."""
    exports = _exports(init_file, package)
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later uses do not come here again
        return value

    return sorted(exports), __getattr__
