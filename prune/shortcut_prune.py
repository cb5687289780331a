"""shortcut pruning: every conv of a residual chain takes the mask of the chain's first conv.

    python prune/shortcut_prune.py --weights sparse.pt --data datasets/shapes/shapes.data

See prune/cli.py for the flags all six methods share and README.md for the whole workflow.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from prune.cli import script

if __name__ == "__main__":
    sys.exit(script("shortcut"))
