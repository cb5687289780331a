"""`python normal_prune.py ...` from the project root, as the older tools ran it: the same script as
prune/normal_prune.py (see it, or `--help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from any folder

from prune.cli import script

if __name__ == "__main__":
    sys.exit(script("normal"))
