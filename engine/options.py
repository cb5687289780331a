"""What every training run is given, whatever techniques its hooks add: the engine's option group.

Each field is also its ``train.py`` flag (:func:`utils.cli.option`); sparsity, distillation and
quantization declare their own groups beside their hooks (:mod:`prune.sparsity`, :mod:`distill.hook`,
:mod:`quant.hook`). Hyperparameters come from ``data/hyp.scratch.yaml``, overridden by ``--hyp``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from utils.cli import BATCH, COUNT0, EPOCHS, IMG_SIZE, SEED, WORKERS, option
from utils.errors import UserError
from utils.files import read_text

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HYP = REPO / "data" / "hyp.scratch.yaml"
DEFAULT_CFG = "cfg/yolo-small.cfg"


def default_workers() -> int:
    """Loader processes: none on a machine with 2 cores or fewer, where worker processes compete with
    PyTorch's threads (a training step at 224 took 693 ms with 0 workers, 741 with 1, 759 with 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


@dataclass
class TrainOptions:
    cfg: str = option("", "--cfg", help="model cfg (default: the cfg inside a .pt --weights, else "
                                        "cfg/yolo-small.cfg)")
    data: str = option("", "--data", help=".data file (default: built-in shapes benchmark)")
    weights: str = option("", "--weights", help="initial weights: .pt, or darknet weights for --cfg")
    # yolo-small on shapes-hard: 0.60 mAP@0.5 in 15 minutes on 2 CPU cores (16 epochs: 0.45)
    epochs: int = option(24, "--epochs", type=EPOCHS)
    batch_size: int = option(16, "--batch-size", type=BATCH, help="total over all processes")
    accumulate: int = option(0, "--accumulate", type=COUNT0,
                             help="batches per optimizer step (default 0: as many as make 64 images)")
    img_size: list[int] = option(None, "--img-size", type=IMG_SIZE, nargs="+", factory=lambda: [224],
                                 help="[min-train max-train] test")
    multi_scale: bool = option(False, "--multi-scale", help="vary the size between min and max train")
    rect: bool = option(False, "--rect", help="rectangular training batches (no mosaic)")
    resume: str = option("", "--resume", nargs="?", const="latest",
                         help="continue a run from its last.pt (alone: the newest under --project)")
    nosave: bool = option(False, "--nosave", help="only save the final checkpoint")
    notest: bool = option(False, "--notest", help="only evaluate after the final epoch")
    name: str = option("exp", "--name", help="run folder runs/train/<name> (numbered if it exists)")
    project: str = option("runs/train", "--project")
    exist_ok: bool = option(False, "--exist-ok", help="reuse runs/train/<name> instead of numbering")
    device: str = option("", "--device", help="cpu, 0, cuda:1 (default: cpu)")
    adam: bool = option(True, "--adam", negatable=True,
                        help="Adam at lr0 × hyp adam_lr_ratio (default); --no-adam: SGD with Nesterov "
                             "momentum at lr0")
    ema: bool = option(True, "--ema", negatable=True,
                       help="exponential moving average of the weights (evaluated and saved)")
    amp: bool = option(False, "--amp", "-mpt", help="mixed precision (CUDA only)")
    workers: int = option(None, "--workers", type=WORKERS, factory=default_workers,
                          help="dataloader processes (default: 0 on 2 cores or fewer, else min(8, cores/2))")
    seed: int = option(0, "--seed", type=SEED)
    hyp: str = option("", "--hyp", help="YAML overriding data/hyp.scratch.yaml")
    cache_images: bool = option(False, "--cache-images", help="keep resized images in memory")
    pt: bool = option(False, "-pt", "--pt",
                      help="the older tools' 'start from pretrained --weights' (always so here: tensors are "
                           "transferred, the class count may differ)")

    def check(self) -> None:
        if self.weights == "None" and not Path(self.weights).exists():  # the older tools' "no weights"
            self.weights = ""
        if self.pt and not self.weights:
            raise UserError("-pt: give the pretrained --weights (a .pt, or darknet weights with --cfg)")

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(min train, max train, test) image sizes from the one-to-three ``--img-size`` values."""
        s = list(self.img_size)
        if not 1 <= len(s) <= 3:
            raise UserError(f"--img-size takes 1 to 3 values (min max test), got {len(s)}")
        s += [s[-1]] * (3 - len(s))
        return s[0], s[1], s[2]


def in_repo(path: str | Path) -> Path:
    """A relative path that is missing here but exists in the repository (the shipped cfgs) goes there."""
    p = Path(path)
    return REPO / p if not p.is_absolute() and not p.exists() and (REPO / p).exists() else p


def load_hyp(path: str | Path = "") -> dict[str, Any]:
    """The default hyperparameters, overridden by the keys of a user YAML (unknown keys are an error)."""
    hyp = yaml.safe_load(DEFAULT_HYP.read_text())
    if path:
        p = Path(path)
        try:
            user = yaml.safe_load(read_text(p, "--hyp")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--hyp {p}: not valid YAML ({e})".replace("\n", " ")) from None
        if not isinstance(user, dict):
            raise UserError(f"--hyp {p}: expected a mapping of hyperparameter: value")
        unknown = sorted(set(user) - set(hyp))
        if unknown:
            raise UserError(f"--hyp {p}: unknown keys {unknown}; known keys are in {DEFAULT_HYP}")
        hyp.update(user)
    return hyp
