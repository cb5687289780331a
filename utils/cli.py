"""Command-line plumbing shared by the scripts."""

from __future__ import annotations

import sys
from collections.abc import Callable

from utils.errors import UserError


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a script's ``main``; a UserError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def not_yet(script: str, issue: int) -> int:
    """For scripts whose issue has not landed: say so on one line and return exit status 2."""
    print(f"error: {script} is not implemented yet (issue #{issue}); see README.md for what works "
          f"today", file=sys.stderr)
    return 2
