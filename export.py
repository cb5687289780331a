"""export.py: write a trained model in the formats deployment needs (onnx, onnx-int8, engine, weights,
fpga), each checked before it is kept. The formats, checks and output names: ``--help`` and
deploy/export.py, which runs the export.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx weights
    python export.py --weights runs/train/qat/weights/last.pt --include onnx-int8 engine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy.export import ExportOptions, parse, run
from deploy.export import build_parser as _build_parser
from utils.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    return _build_parser()


def parse_args(argv: list[str] | None = None) -> ExportOptions:
    return parse(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    """Export; returns the files written."""
    return run(parse_args(argv)).outputs


if __name__ == "__main__":
    sys.exit(run_cli(main))
