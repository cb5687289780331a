"""``compress.py``: run a recipe's stages, then measure every stage into the report."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.options import REPO
from pipeline.recipe import load_recipe
from pipeline.runner import Pipeline
from utils.cli import COUNT, IMG_SIZE, option

DEFAULT_RECIPE = REPO / "recipes" / "default.yaml"


@dataclass
class CompressOptions:
    """The flags of ``compress.py``."""
    recipe: str = option(str(DEFAULT_RECIPE), "--recipe", help="the recipe (default: recipes/default.yaml)")
    name: str = option("", "--name", help="run folder <project>/<name> (default: the recipe's name)")
    project: str = option("runs/compress", "--project")
    data: str | None = option(None, "--data", help="override the recipe's .data file")
    cfg: str | None = option(None, "--cfg", help="override the recipe's cfg (the first stage's model)")
    img_size: int | None = option(None, "--img-size", type=IMG_SIZE, help="override the recipe's image size")
    device: str | None = option(None, "--device", help="override the recipe's training device (cpu, 0, ...)")
    weights: str = option("", "--weights",
                          help="a trained .pt that stands in for the first stage (the baseline is not "
                               "trained)")
    restart_from: str = option("", "--restart-from", metavar="STAGE",
                               help="delete the outputs of STAGE and every later stage, then run them again")
    no_report: bool = option(False, "--no-report", help="run the stages only")
    latency_runs: int = option(30, "--latency-runs", type=COUNT, help="timed runs per model in the report")


def run(o: CompressOptions) -> Path | None:
    """The stages in order (finished ones skipped), then the report; returns report.md (None without
    one, and on the other torchrun processes)."""
    from pipeline import report

    recipe = load_recipe(o.recipe)
    for key in ("data", "cfg", "img_size", "device"):
        if getattr(o, key) is not None:
            setattr(recipe, key, getattr(o, key))
    root = Path(o.project) / (o.name or recipe.path.stem)
    pipeline = Pipeline(recipe, root, o.weights or None)
    if o.restart_from:
        recipe.index(o.restart_from)  # an unknown stage is an error before anything is deleted
        pipeline.clear_from(o.restart_from)
    t0 = time.time()
    try:
        records = pipeline.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to continue from the unfinished stage ({root})",
              file=sys.stderr)
        raise
    finally:
        pipeline.close()
    if o.no_report or not pipeline.main:
        return None
    print("\n=== report ===")
    seconds = time.time() - t0
    md = report.write(records, recipe, root, seconds + sum(r.seconds for r in records if r.skipped),
                      o.latency_runs)
    print(md.read_text())
    print(f"report: {md} (stages {seconds / 60:.1f} min in this invocation)")
    return md
