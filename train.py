"""train.py: training (issue #3), with sparsity, distillation and QAT hooks. Not implemented yet."""

import sys

from utils.cli import not_yet

if __name__ == "__main__":
    sys.exit(not_yet("train.py", 3))
