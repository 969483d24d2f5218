"""Exclude patterns in the style of restic and gitignore.

Patterns are matched against an entry's absolute path:

- a pattern starting with ``/`` is anchored at the file system root
  (``/home/me/tmp``); any other pattern may match at any depth, so ``*.tmp``,
  ``cache`` and ``build/out`` match wherever they occur;
- ``*`` and ``?`` match within one name, ``[...]`` is a character class,
  ``**`` as a whole name matches any number of names (``**/cache``, ``a/**/b``,
  ``logs/**``), and ``\\`` escapes the next character;
- a trailing ``/`` matches directories only;
- ``!pattern`` re-includes what an earlier pattern excluded (the last matching
  pattern wins); nothing can be re-included below an excluded directory,
  since an excluded directory is not read at all.

Exclude files hold one pattern per line; empty lines and lines starting with
``#`` are ignored, surrounding white space is removed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stratavault.errors import UsageError

__all__ = ["ExcludeMatcher", "read_exclude_file"]


@dataclass(frozen=True, slots=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


class ExcludeMatcher:
    """Decides whether a path is excluded by a list of patterns."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(p for p in patterns if p)
        self._rules = [_compile_rule(p) for p in self.patterns]  # UsageError if invalid
        self._simple = not any(r.negate for r in self._rules)
        self._any = _union(r.regex for r in self._rules if not r.dir_only)
        self._dirs = _union(r.regex for r in self._rules if r.dir_only)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def excluded(self, path: str, *, is_dir: bool) -> bool:
        """Tell whether the absolute ``path`` (a directory if ``is_dir``) is excluded."""
        if self._simple:
            if self._any is not None and self._any.fullmatch(path):
                return True
            return is_dir and self._dirs is not None and self._dirs.fullmatch(path) is not None
        for rule in reversed(self._rules):
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.fullmatch(path):
                return not rule.negate
        return False


def read_exclude_file(path: Path) -> list[str]:
    """Read the patterns of an exclude file; raise ``UsageError`` if it cannot be read."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise UsageError(f"reading exclude file {path} - {exc.strerror or exc}") from exc
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    return patterns


def _union(regexes: Iterable[re.Pattern[str]]) -> re.Pattern[str] | None:
    sources = [r.pattern for r in regexes]
    if not sources:
        return None
    return re.compile("|".join(f"(?:{s})" for s in sources), re.DOTALL)


def _compile_rule(pattern: str) -> _Rule:
    negate = pattern.startswith("!")
    body = pattern[1:] if negate else pattern
    dir_only = body.endswith("/") and body != "/"
    anchored = body.startswith("/")
    names = [n for n in body.split("/") if n]
    out = "/" if anchored else "(?:.*/)?"
    for i, name in enumerate(names):
        last = i == len(names) - 1
        if name == "**":
            out += ".*" if last else "(?:.*/)?"
        else:
            out += _translate_name(name) + ("" if last else "/")
    try:
        return _Rule(re.compile(out, re.DOTALL), negate, dir_only)
    except re.error as exc:
        raise UsageError(f"exclude pattern {pattern!r} is invalid - {exc}") from exc


def _translate_name(name: str) -> str:
    """Translate one glob name (no ``/``) into a regular expression."""
    out: list[str] = []
    i, n = 0, len(name)
    while i < n:
        c = name[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i < n:
            out.append(re.escape(name[i]))
            i += 1
        elif c == "[":
            end = _class_end(name, i)
            if end < 0:
                out.append(re.escape(c))
                continue
            inner = name[i:end].replace("\\", "\\\\")
            if inner.startswith("!"):
                inner = "^" + inner[1:]
            out.append(f"(?!/)[{inner}]")
            i = end + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


def _class_end(name: str, start: int) -> int:
    """Return the index of the ``]`` closing a class opened before ``start``, or -1."""
    j = start
    if j < len(name) and name[j] in "!^":
        j += 1
    if j < len(name) and name[j] == "]":
        j += 1
    return name.find("]", j)
