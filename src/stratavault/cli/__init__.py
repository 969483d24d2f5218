"""The command line: thin commands over the jobs layer."""

import sys
from collections.abc import Sequence


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv``; return the exit code."""
    from stratavault.cli._app import main as app_main

    return app_main(argv)


def main() -> None:
    """Entry point of the ``stratavault`` console script."""
    try:
        code = run()
    except KeyboardInterrupt:  # Ctrl-C before the command set up its own handling
        print("stratavault: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


__all__ = ["main", "run"]
