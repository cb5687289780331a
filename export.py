"""export.py: write a trained model in the formats deployment needs.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx
    python export.py --cfg cfg/yolov3-tiny.cfg --weights yolov3-tiny.weights --include onnx --img-size 416

Today: ``onnx`` (checked against onnxruntime). INT8 ONNX, TensorRT engines, darknet weights and FPGA
packages come with the quantization and export issues (#6, #7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.io import load_checkpoint, load_model
from utils.cli import run_cli
from utils.errors import UserError

FORMATS = {"onnx": None, "onnx-int8": 7, "engine": 7, "weights": 7, "fpga": 7}


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help=".pt checkpoint, or darknet weights with --cfg")
    p.add_argument("--cfg", default=None)
    p.add_argument("--include", nargs="+", default=["onnx"], choices=list(FORMATS))
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="h [w]; default: the checkpoint's")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and image size")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--output", default=None, help="output stem (default: beside the weights)")
    a = p.parse_args(argv)
    weights = Path(a.weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    later = [f for f in a.include if FORMATS[f] is not None]
    if later:
        raise UserError(f"--include {' '.join(later)}: not implemented yet (issue #{FORMATS[later[0]]}); "
                        f"available today: onnx")
    meta = load_checkpoint(weights)["meta"] if weights.suffix == ".pt" else {}
    model = load_model(weights, a.cfg).eval()
    size = a.img_size or [meta.get("img_size", 416)]
    hw = (size[0], size[-1])
    stem = Path(a.output) if a.output else weights.with_suffix("")
    from models.onnx import export_onnx

    out = export_onnx(model, stem.with_suffix(".onnx"), hw, a.opset, a.dynamic, meta.get("names"))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), checked against onnxruntime")
    return [out]


if __name__ == "__main__":
    sys.exit(run_cli(main))
