"""export.py: write a trained model in the formats deployment needs.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx
    python export.py --cfg cfg/yolov3-tiny.cfg --weights yolov3-tiny.weights --include onnx --img-size 416

Today: ``onnx`` (batch norms folded, checked against onnxruntime; ``--dynamic`` for any batch and
image size). INT8 ONNX, TensorRT engines, darknet weights and FPGA packages come with issue #7.
Outputs go beside the weights (``best.pt`` -> ``best.onnx``) unless ``--output`` gives another stem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.io import load_checkpoint, load_model
from utils.cli import run_cli
from utils.errors import UserError

FORMATS = {"onnx": None, "onnx-int8": 7, "engine": 7, "weights": 7, "fpga": 7}  # format -> issue, if later


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help=".pt checkpoint, or darknet weights with --cfg")
    p.add_argument("--cfg", default=None, help="darknet cfg (needed with darknet weights)")
    p.add_argument("--include", nargs="+", default=["onnx"], choices=list(FORMATS), help="formats to write")
    p.add_argument("--img-size", type=int, nargs="+", default=None,
                   help="h [w]; default: the checkpoint's training size, else the cfg's [net] size")
    p.add_argument("--dynamic", action="store_true", help="ONNX: dynamic batch, height and width")
    p.add_argument("--simplify", action="store_true", help="ONNX: onnxruntime's basic graph optimisations")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--output", default=None, help="output stem (default: the weights' path without suffix)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    a = parse_args(argv)
    weights = Path(a.weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    later = [f for f in a.include if FORMATS[f] is not None]
    if later:
        raise UserError(f"--include {' '.join(later)}: not implemented yet (issue #{FORMATS[later[0]]}); "
                        f"available today: onnx")
    if a.img_size is not None and len(a.img_size) > 2:
        raise UserError(f"--img-size {' '.join(map(str, a.img_size))}: give one size, or height and width")
    meta = load_checkpoint(weights)["meta"] if weights.suffix == ".pt" else {}
    model = load_model(weights, a.cfg).eval().fuse()
    if a.img_size:
        hw = (a.img_size[0], a.img_size[-1])
    elif meta.get("img_size"):
        hw = (int(meta["img_size"]), int(meta["img_size"]))
    else:
        hw = (model.cfg.net["height"], model.cfg.net["width"])
    stem = Path(a.output) if a.output else weights.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    from models.onnx import export_onnx

    out = export_onnx(model, stem.with_suffix(".onnx"), hw, a.opset, a.dynamic, a.simplify, meta.get("names"))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) at {hw[0]}x{hw[1]}"
          f"{', dynamic' if a.dynamic else ''}")
    return [out]


if __name__ == "__main__":
    sys.exit(run_cli(main))
