"""compress.py: train, sparsify, prune, fine-tune, quantize and export a detector in one run, with a report.

    python compress.py                                     # recipes/default.yaml on the built-in benchmark
    python compress.py --recipe recipes/jetson-int8.yaml --data my.data --weights my_trained.pt
    python compress.py --recipe recipes/fpga-pow2.yaml --name fpga1
    python compress.py --restart-from prune                # rerun prune and every stage after it
    torchrun --nproc_per_node 4 compress.py --device 0     # training stages on 4 GPUs (DDP)

A recipe (``recipes/*.yaml``, see ``pipeline/recipe.py``) lists the stages and their options, with the
scripts' own flag names. Each stage writes into ``runs/compress/<name>/<stage>/`` and is skipped when it
finished before, so an interrupted run continues where it stopped. At the end every stage is measured
(mAP, parameters, GFLOPs, file size, PyTorch and onnxruntime CPU latency) and
``runs/compress/<name>/report/report.md`` (+ ``report.json`` and plots) is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.compress import CompressOptions, run
from utils.cli import from_namespace, options_parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    return options_parser("compress.py", __doc__, CompressOptions)


def parse_args(argv: list[str] | None = None) -> CompressOptions:
    return from_namespace(CompressOptions, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> Path | None:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
