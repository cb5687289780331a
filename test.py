"""test.py: mAP@0.5, mAP@0.5:0.95, P, R, F1 per class, speed, PR curve and confusion matrix.

    python test.py --weights runs/train/exp/weights/best.pt            # built-in benchmark, val split
    python test.py --cfg cfg/yolov3-tiny.cfg --weights yolov3-tiny.weights --data my.data --save-json
    python test.py --weights runs/train/exp/weights/best.int8.onnx   # an export, in onnxruntime
"""

from __future__ import annotations

import argparse
import sys

from utils.cli import from_namespace, options_parser, run_cli
from utils.evaluate import EvalResult, TestOptions, evaluate_weights


def build_parser() -> argparse.ArgumentParser:
    return options_parser("test.py", __doc__, TestOptions)


def parse_args(argv: list[str] | None = None) -> TestOptions:
    return from_namespace(TestOptions, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> EvalResult:
    return evaluate_weights(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
