"""test.py: mAP evaluation. Not implemented yet: it arrives with issue #3.

Until then this script says so and exits with status 2. What works today is listed in README.md
(build a model from a cfg, load and save darknet .weights and .pt checkpoints, print its summary).
"""

from __future__ import annotations

import sys

from utils.cli import run_cli
from utils.errors import UserError


def main(argv: list[str] | None = None) -> None:
    raise UserError("test.py is not implemented yet (issue #3); see README.md for what works today")


if __name__ == "__main__":
    sys.exit(run_cli(main))
