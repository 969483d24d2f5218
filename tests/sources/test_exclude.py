"""Exclude pattern semantics."""

from __future__ import annotations

import pytest

from stratavault.errors import UsageError
from stratavault.sources import ExcludeMatcher


@pytest.mark.parametrize(
    ("pattern", "path", "is_dir", "excluded"),
    [
        ("*.tmp", "/home/u/x.tmp", False, True),
        ("*.tmp", "/home/u/x.tmp.keep", False, False),
        ("*.tmp", "/x.tmp/y", False, False),  # only the directory itself matches
        ("cache", "/a/b/cache", True, True),
        ("cache", "/a/b/cached", True, False),
        ("/abs/path", "/abs/path", False, True),
        ("/abs/path", "/other/abs/path", False, False),
        ("**/cache", "/cache", True, True),
        ("**/cache", "/a/b/cache", True, True),
        ("a/**/b", "/x/a/b", False, True),
        ("a/**/b", "/x/a/1/2/b", False, True),
        ("/logs/**", "/logs/a/b", False, True),
        ("/logs/**", "/logs", True, False),
        ("build/out", "/src/build/out", True, True),
        ("build/out", "/src/xbuild/out", True, False),
        ("f?o", "/x/foo", False, True),
        ("f?o", "/x/f/o", False, False),
        ("*", "/anything", False, True),
        ("[ab].c", "/q/a.c", False, True),
        ("[!ab].c", "/q/a.c", False, False),
        ("[!ab].c", "/q/z.c", False, True),
        ("tmp/", "/x/tmp", False, False),
        ("tmp/", "/x/tmp", True, True),
        ("\\*", "/x/*", False, True),
        ("\\*", "/x/y", False, False),
        ("a.b", "/x/aXb", False, False),
    ],
)
def test_pattern(pattern: str, path: str, is_dir: bool, excluded: bool) -> None:
    assert ExcludeMatcher([pattern]).excluded(path, is_dir=is_dir) is excluded


def test_negation_last_match_wins() -> None:
    m = ExcludeMatcher(["*.log", "!keep.log", "/var/keep.log"])
    assert m.excluded("/x/a.log", is_dir=False)
    assert not m.excluded("/x/keep.log", is_dir=False)
    assert m.excluded("/var/keep.log", is_dir=False)


def test_empty_matcher_is_false() -> None:
    m = ExcludeMatcher([])
    assert not m and not m.excluded("/a", is_dir=True)


def test_invalid_pattern_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="exclude pattern"):
        ExcludeMatcher(["[z-a]"])
