"""Post-training quantization: calibrate a trained float checkpoint on N training images.

    python -m quant.ptq --weights runs/train/exp/weights/last.pt --data datasets/shapes/shapes.data \\
        --w-bit 8 --a-bit 8 --calib mse --images 256 [--FPGA]

The model is quantized with the same modules as QAT (Google scales, batch norms folded with their
running statistics). Calibration runs the model in eval mode while only the activation observers
watch; ``--calib`` then sets each range: ``minmax`` (the extremes seen), ``percentile`` (the
``--percentile`` and ``100 − p`` points of a sample) or ``mse`` (the clipped range with the least
squared quantization error on the sample). Weights use their per-channel min-max (``--per-tensor``:
one scale per conv). Writes ``quantized.pt`` and ``report.json`` into a new ``runs/ptq/<name>``, or
into ``--output`` (checked first: an input is never written over, an existing file only with
``--exist-ok``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.io import open_checkpoint, resolve_img_size, save_checkpoint
from models.quantized.convert import TARGETS, freeze_observers, quant_config, quantize_model
from models.quantized.modules import ActQuant, QuantSpec
from utils.cli import (
    BATCH,
    BITS,
    COUNT,
    IMG_SIZE,
    PERCENTILE,
    from_namespace,
    option,
    options_parser,
    run_cli,
    values_from_mapping,
)
from utils.errors import UserError
from utils.files import new_run_dir, next_run_dir
from utils.outputs import OutputPlan, atomic_write
from utils.results import StageResult

CALIBRATIONS = ("minmax", "percentile", "mse")


@dataclass
class PtqOptions:
    """The flags of ``python -m quant.ptq``."""
    weights: str = option("", "--weights", required=True, help="trained float .pt")
    data: str = option("", "--data", required=True, help=".data file whose training images calibrate")
    cfg: str = option("", "--cfg", help="not needed (a .pt carries its cfg); when given, it must be that cfg")
    w_bit: int = option(8, "--w-bit", type=BITS)
    a_bit: int = option(8, "--a-bit", type=BITS)
    calib: str = option("mse", "--calib", choices=CALIBRATIONS)
    percentile: float = option(99.99, "--percentile", type=PERCENTILE)
    images: int = option(256, "--images", type=COUNT, help="calibration images")
    batch_size: int = option(16, "--batch-size", type=BATCH)
    img_size: int | None = option(None, "--img-size", type=IMG_SIZE, help="default: the checkpoint's")
    fpga: bool = option(False, "--FPGA", "--fpga", help="power-of-two scales, every layer quantized")
    per_tensor: bool = option(False, "--per-tensor", help="one weight scale per conv")
    a_symmetric: bool = option(False, "--a-symmetric",
                               help="symmetric signed activations with zero point 0 (TensorRT) instead of "
                                    "affine")
    int8_target: str = option("trt", "--int8-target", choices=TARGETS,
                              help="the INT8 runtime the model is laid out for: trt (TensorRT, with "
                                   "--a-symmetric) or ort (onnxruntime's CPU integer kernels, uint8 "
                                   "activations)")
    name: str = option("exp", "--name")
    output: str = option("", "--output", help="output folder (default: a new runs/ptq/<name>)")
    exist_ok: bool = option(False, "--exist-ok", help="replace the outputs in an existing --output")


def build_parser() -> argparse.ArgumentParser:
    return options_parser("python -m quant.ptq", __doc__, PtqOptions)


def parse(argv: list[str] | None) -> PtqOptions:
    return from_namespace(PtqOptions, build_parser().parse_args(argv))


def from_mapping(mapping: Mapping[str, Any], where: str) -> PtqOptions:
    """A recipe stage's options, each checked as its flag is."""
    return PtqOptions(**values_from_mapping([PtqOptions], mapping, where, "python -m quant.ptq")[PtqOptions])


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Observe ``batches`` with the model in eval mode, then set every activation range by its
    observer's method; returns the number of images seen."""
    model.eval()
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]  # a shared one is listed once
    for q in quants:
        q.train()  # only the observers watch; batch norms keep their running statistics
    n = 0
    with torch.no_grad():
        for imgs in batches:
            model(imgs)
            n += imgs.shape[0]
    for q in quants:
        q.eval()
        for o in q.observers:
            lo, hi = o.calibrated_range(q.scheme)
            o.lo.copy_(lo)
            o.hi.copy_(hi)
    freeze_observers(model)
    return n


def run(o: PtqOptions) -> StageResult:
    """Calibrate and write ``quantized.pt`` and ``report.json``; the result's value is the report."""
    if Path(o.weights).suffix != ".pt":
        raise UserError(f"--weights {o.weights}: expected a trained float .pt checkpoint")
    opened = open_checkpoint(o.weights, o.cfg or None)
    model, meta, weights = opened.model, opened.meta, opened.path
    if meta.get("quant"):
        raise UserError(f"--weights {weights}: already quantized; give the float checkpoint")
    img_size = resolve_img_size(o.img_size, opened.img_size, model)
    from utils.datasets import create_dataloader, read_data_file

    data = read_data_file(Path(o.data))
    if data.classes != model.cfg.classes:
        raise UserError(f"{weights}: the model predicts {model.cfg.classes} classes, {data.path} has "
                        f"{data.classes}")
    try:
        spec = QuantSpec("google", o.w_bit, o.a_bit, per_channel=not o.per_tensor, bn_fold=True, pow2=o.fpga,
                         a_symmetric=o.a_symmetric)
    except ValueError as e:
        raise UserError(f"--w-bit {o.w_bit} --a-bit {o.a_bit}: {e}") from None
    config = quant_config(spec, o.fpga, o.int8_target, observer=o.calib, percentile=o.percentile)
    out = Path(o.output) if o.output else next_run_dir("runs/ptq", o.name)
    plan = OutputPlan([weights, o.data, o.cfg], o.exist_ok)
    outputs = [plan.add(out / "quantized.pt"), plan.add(out / "report.json")]
    plan.check()  # before calibrating: a refused run writes nothing
    quantize_model(model, config)
    loader, _ = create_dataloader(data.split("train"), data.classes, img_size, o.batch_size,
                                  model.max_stride, shuffle=True, seed=0, verbose=False)
    n_batches = max(1, -(-o.images // o.batch_size))
    batches = (imgs.float() / 255 for _, (imgs, *_) in zip(range(n_batches), loader))
    seen = calibrate(model, batches)
    if not o.output:  # made only now, so a failed run leaves no empty folder
        out = new_run_dir("runs/ptq", o.name)
        outputs = [out / p.name for p in outputs]
    save_checkpoint(outputs[0], model, names=meta.get("names"), img_size=img_size,
                    ptq={"source": str(weights), "images": seen, "calib": o.calib})
    report = {"source": str(weights), "images": seen, "img_size": img_size, "options": dataclasses.asdict(o),
              "quant": config.to_dict()}
    atomic_write(outputs[1], json.dumps(report, indent=2))
    print(f"calibrated on {seen} images ({o.calib}); wrote {outputs[0]}")
    return StageResult(outputs[0], [], report)


def main(argv: list[str] | None = None) -> dict:
    return run(parse(argv)).value


if __name__ == "__main__":
    sys.exit(run_cli(main))
