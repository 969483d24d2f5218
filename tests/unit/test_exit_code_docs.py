"""The exit codes documented in the README and docs/cli.md are those of ``EXIT_CODES``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stratavault.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("doc", ["README.md", "docs/cli.md"])
def test_documented_exit_codes_are_the_real_ones(doc: str) -> None:
    text = (ROOT / doc).read_text()
    section = re.split(r"^#+ Exit codes\n", text, maxsplit=1, flags=re.MULTILINE)[1]
    table = section.lstrip("\n").split("\n\n", 1)[0]  # the block after the heading
    codes = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)}
    assert codes == set(EXIT_CODES), doc
