"""The shape of the code base: layers (import-linter), private modules, package faces."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


@dataclass(frozen=True)
class Violation:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports private {self.imported}"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def imported_names(tree: ast.AST, importer: str, is_package: bool) -> list[tuple[str, int]]:
    """Every dotted module (or module.attribute) name a module imports, absolute."""
    found: list[tuple[str, int]] = []
    package = importer if is_package else importer.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            found.extend((f"{module}.{alias.name}", node.lineno) for alias in node.names)
    return found


def private_import_violations(src: Path, root_package: str) -> list[Violation]:
    """Imports of `pkg._private` (or deeper) from modules outside `pkg`."""
    violations: list[Violation] = []
    for path in sorted((src / root_package).rglob("*.py")):
        importer = module_name(path, src)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line in imported_names(tree, importer, path.name == "__init__.py"):
            parts = name.split(".")
            if parts[0] != root_package:
                continue
            for i, part in enumerate(parts[1:], start=1):
                if is_private(part):
                    owner = ".".join(parts[:i])
                    if importer != owner and not importer.startswith(owner + "."):
                        violations.append(Violation(importer, name, line))
                    break
    return violations


def packages(src: Path, root_package: str) -> list[str]:
    return sorted(module_name(p, src) for p in (src / root_package).rglob("__init__.py"))


def test_import_linter_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=SRC.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_reaches_into_another_packages_private_modules() -> None:
    violations = private_import_violations(SRC, "stratavault")
    assert not violations, "\n".join(map(str, violations))


@pytest.mark.parametrize("package", packages(SRC, "stratavault"))
def test_package_all_names_exist(package: str) -> None:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", [])
    assert len(names) == len(set(names)), f"{package}.__all__ has duplicates"
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names missing from the package: {missing}"


def write(root: Path, relative: str, text: str = "") -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_private_import_check_catches_violations(tmp_path: Path) -> None:
    write(tmp_path, "pkg/__init__.py")
    write(tmp_path, "pkg/a/__init__.py", "from pkg.a._impl import f\nfrom ._impl import g\n")
    write(tmp_path, "pkg/a/_impl.py", "from pkg.a._other import h\n")
    write(tmp_path, "pkg/a/_other.py")
    write(tmp_path, "pkg/b/__init__.py", "from pkg.a import f\n")
    write(tmp_path, "pkg/b/bad.py", "import pkg.a._impl\nfrom pkg.a import _other\n")
    write(tmp_path, "pkg/b/_rel.py", "from ..a._impl import f\n")
    write(tmp_path, "pkg/c.py", "from pkg.b._rel import x\nfrom pkg import a\n")

    found = {(v.importer, v.imported) for v in private_import_violations(tmp_path, "pkg")}

    assert found == {
        ("pkg.b.bad", "pkg.a._impl"),
        ("pkg.b.bad", "pkg.a._other"),
        ("pkg.b._rel", "pkg.a._impl"),
        ("pkg.b._rel", "pkg.a._impl.f"),
        ("pkg.c", "pkg.b._rel"),
        ("pkg.c", "pkg.b._rel.x"),
    }
