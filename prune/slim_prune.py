"""slim pruning: global |gamma| threshold with a per-layer floor (--layer-keep); a residual chain keeps
the union of its members' masks.

    python prune/slim_prune.py --weights sparse.pt --data datasets/shapes/shapes.data

See prune/cli.py for the flags all six methods share and README.md for the whole workflow.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from prune.cli import script

if __name__ == "__main__":
    sys.exit(script("slim"))
