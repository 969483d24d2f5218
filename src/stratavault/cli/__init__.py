"""The command line: thin commands over the jobs layer."""

import sys
from collections.abc import Sequence


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv``; return the exit code."""
    from stratavault.cli._app import main as app_main

    return app_main(argv)


def main() -> None:
    """Entry point of the ``stratavault`` console script."""
    sys.exit(run())


__all__ = ["main", "run"]
