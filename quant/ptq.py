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
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from models.io import load_checkpoint, load_model, save_checkpoint
from quant.convert import QuantConfig, freeze_observers, quantize_model
from quant.modules import ActQuant, QuantSpec
from utils.cli import BATCH, BITS, COUNT, IMG_SIZE, PERCENTILE, Parser, run_cli
from utils.errors import UserError
from utils.files import new_run_dir, next_run_dir
from utils.outputs import OutputPlan, atomic_write

CALIBRATIONS = ("minmax", "percentile", "mse")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m quant.ptq",
               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="trained float .pt")
    p.add_argument("--data", required=True, help=".data file whose training images calibrate")
    p.add_argument("--w-bit", type=BITS, default=8)
    p.add_argument("--a-bit", type=BITS, default=8)
    p.add_argument("--calib", choices=CALIBRATIONS, default="mse")
    p.add_argument("--percentile", type=PERCENTILE, default=99.99)
    p.add_argument("--images", type=COUNT, default=256, help="calibration images")
    p.add_argument("--batch-size", type=BATCH, default=16)
    p.add_argument("--img-size", type=IMG_SIZE, default=None, help="default: the checkpoint's")
    p.add_argument("--FPGA", "--fpga", dest="fpga", action="store_true",
                   help="power-of-two scales, every layer quantized")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per conv")
    p.add_argument("--a-symmetric", action="store_true",
                   help="symmetric signed activations with zero point 0 (TensorRT) instead of affine")
    p.add_argument("--name", default="exp")
    p.add_argument("--output", default=None, help="output folder (default: a new runs/ptq/<name>)")
    p.add_argument("--exist-ok", action="store_true", help="replace the outputs in an existing --output")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    weights = Path(a.weights)
    if weights.suffix != ".pt" or not weights.is_file():
        raise UserError(f"--weights {weights}: expected a trained float .pt checkpoint")
    meta = load_checkpoint(weights)["meta"]
    if meta.get("quant"):
        raise UserError(f"--weights {weights}: already quantized; give the float checkpoint")
    model = load_model(weights)
    img_size = a.img_size or meta.get("img_size") or model.cfg.net["height"]
    from utils.datasets import create_dataloader, read_data_file

    data = read_data_file(Path(a.data))
    if data.classes != model.cfg.classes:
        raise UserError(f"{weights}: the model predicts {model.cfg.classes} classes, {data.path} has "
                        f"{data.classes}")
    try:
        spec = QuantSpec("google", a.w_bit, a.a_bit, per_channel=not a.per_tensor, bn_fold=True, pow2=a.fpga,
                         a_symmetric=a.a_symmetric)
    except ValueError as e:
        raise UserError(f"--w-bit {a.w_bit} --a-bit {a.a_bit}: {e}") from None
    config = QuantConfig(spec, fpga=a.fpga, observer=a.calib, percentile=a.percentile)
    out = Path(a.output) if a.output else next_run_dir("runs/ptq", a.name)
    plan = OutputPlan([weights, a.data], a.exist_ok)
    outputs = [plan.add(out / "quantized.pt"), plan.add(out / "report.json")]
    plan.check()  # before calibrating: a refused run writes nothing
    quantize_model(model, config)
    loader, _ = create_dataloader(data.split("train"), data.classes, img_size, a.batch_size,
                                  model.max_stride, shuffle=True, seed=0, verbose=False)
    n_batches = max(1, -(-a.images // a.batch_size))
    batches = (imgs.float() / 255 for _, (imgs, *_) in zip(range(n_batches), loader))
    seen = calibrate(model, batches)
    if not a.output:  # made only now, so a failed run leaves no empty folder
        out = new_run_dir("runs/ptq", a.name)
        outputs = [out / p.name for p in outputs]
    save_checkpoint(outputs[0], model, names=meta.get("names"), img_size=img_size,
                    ptq={"source": str(weights), "images": seen, "calib": a.calib})
    report = {"source": str(weights), "images": seen, "options": vars(a), "quant": config.to_dict()}
    atomic_write(outputs[1], json.dumps(report, indent=2))
    print(f"calibrated on {seen} images ({a.calib}); wrote {outputs[0]}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
