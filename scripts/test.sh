#!/usr/bin/env bash
# Run every check, in order, stopping at the first failure:
# ruff check, ruff format --check, mypy, lint-imports, pytest (2 workers, per-test timeout).
#
#   ./scripts/test.sh                 all checks
#   ./scripts/test.sh -k storage      extra arguments go to pytest
#
# With CI=true (or STRATAVAULT_REQUIRE_ALL=1) a skipped test marked `infra` (needs real
# infrastructure: QEMU, S3, a browser...) counts as a failure; see tests/conftest.py.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=.venv/bin
if [ ! -x "$BIN/python" ]; then
    echo "test.sh: no .venv here; run ./scripts/setup.sh first" >&2
    exit 1
fi
if [ "${CI:-}" = "true" ]; then
    export STRATAVAULT_REQUIRE_ALL=1
fi

step() { printf '==> %s\n' "$*"; }

step "ruff check"
"$BIN/ruff" check .
step "ruff format --check"
"$BIN/ruff" format --check .
step "mypy (src, strict)"
"$BIN/mypy"
step "mypy (bench, scripts)"
"$BIN/mypy" bench scripts
step "lint-imports"
"$BIN/lint-imports"
step "pytest"
rc=0
"$BIN/pytest" -n "${PYTEST_WORKERS:-2}" --timeout "${PYTEST_TIMEOUT:-600}" "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": not a failure of the code, but say so loudly.
    echo "test.sh: WARNING: pytest collected no tests" >&2
    rc=0
fi
if [ "$rc" -ne 0 ]; then
    echo "test.sh: pytest failed (exit $rc)" >&2
    exit "$rc"
fi
step "all checks passed"
