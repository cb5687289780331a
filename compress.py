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
import time
from pathlib import Path

from pipeline.recipe import load_recipe
from pipeline.runner import Pipeline
from utils.cli import COUNT, IMG_SIZE, Parser, run_cli

REPO = Path(__file__).resolve().parent
DEFAULT_RECIPE = REPO / "recipes" / "default.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compress.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="the recipe (default: recipes/default.yaml)")
    p.add_argument("--name", default=None, help="run folder <project>/<name> (default: the recipe's name)")
    p.add_argument("--project", default="runs/compress")
    p.add_argument("--data", default=None, help="override the recipe's .data file")
    p.add_argument("--cfg", default=None, help="override the recipe's cfg (the first stage's model)")
    p.add_argument("--img-size", type=IMG_SIZE, default=None, help="override the recipe's image size")
    p.add_argument("--device", default=None, help="override the recipe's training device (cpu, 0, ...)")
    p.add_argument("--weights", default=None,
                   help="a trained .pt that stands in for the first stage (the baseline is not trained)")
    p.add_argument("--restart-from", default=None, metavar="STAGE",
                   help="delete the outputs of STAGE and every later stage, then run them again")
    p.add_argument("--no-report", action="store_true", help="run the stages only")
    p.add_argument("--latency-runs", type=COUNT, default=30, help="timed runs per model in the report")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> Path | None:
    a = parse_args(argv)
    from pipeline import report

    recipe = load_recipe(a.recipe)
    for key in ("data", "cfg", "img_size", "device"):
        if getattr(a, key) is not None:
            setattr(recipe, key, getattr(a, key))
    root = Path(a.project) / (a.name or recipe.path.stem)
    pipeline = Pipeline(recipe, root, a.weights)
    if a.restart_from:
        recipe.index(a.restart_from)  # an unknown stage is an error before anything is deleted
        pipeline.clear_from(a.restart_from)
    t0 = time.time()
    try:
        records = pipeline.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to continue from the unfinished stage ({root})",
              file=sys.stderr)
        raise
    finally:
        pipeline.close()
    if a.no_report or not pipeline.main:
        return None
    print("\n=== report ===")
    seconds = time.time() - t0
    md = report.write(records, recipe, root, seconds + sum(r.seconds for r in records if r.skipped),
                      a.latency_runs)
    print(md.read_text())
    print(f"report: {md} (stages {seconds / 60:.1f} min in this invocation)")
    return md


if __name__ == "__main__":
    sys.exit(run_cli(main))
