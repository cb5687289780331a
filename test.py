"""test.py: mAP evaluation (issue #3). Not implemented yet."""

import sys

from utils.cli import not_yet

if __name__ == "__main__":
    sys.exit(not_yet("test.py", 3))
