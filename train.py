"""train.py: train a darknet-cfg detector (the built-in shapes benchmark by default).

    python train.py                                   # yolo-small on the built-in benchmark
    python train.py --cfg cfg/yolov3-tiny.cfg --data my.data --weights yolov3-tiny.weights --epochs 100
    python train.py --resume runs/train/exp/weights/last.pt
    python train.py -sr --s 3 --sr-schedule local --sr-decay-at 0 --sr-keep 0.38 --sr-rank layer  # sparse
    python train.py --weights pruned.pt --t_weights teacher.pt --KDstr 4   # fine-tune with distillation
    torchrun --nproc_per_node 2 train.py --device cpu # DistributedDataParallel (gloo on CPU, nccl on GPU)

The options and their groups are declared beside what they configure and assembled by
stages/train.py; the loop itself is engine/trainer.py.
"""

from __future__ import annotations

import argparse
import sys

from stages.train import TrainJob, parse, run
from stages.train import build_parser as _build_parser
from utils.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    return _build_parser(__doc__)


def parse_args(argv: list[str] | None = None) -> TrainJob:
    return parse(argv, __doc__)


def main(argv: list[str] | None = None):
    """Train; returns the last evaluation (an EvalResult)."""
    return run(parse_args(argv)).value


if __name__ == "__main__":
    sys.exit(run_cli(main))
