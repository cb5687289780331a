"""Build a model from a darknet cfg (optionally with weights) and print its summary.

    python summary.py --cfg cfg/yolov4-tiny.cfg --img-size 416
    python summary.py --cfg cfg/yolov3.cfg --weights yolov3.weights
    python summary.py --weights runs/train/exp/weights/best.pt --layers
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from models.io import load_model, open_checkpoint, resolve_img_size
from models.summary import summarize
from utils.cli import COUNT, IMG_SIZE, Parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="summary.py", description=__doc__)
    ap.add_argument("--cfg", help="darknet cfg (needed for .weights; optional with a .pt)")
    ap.add_argument("--weights", help=".pt checkpoint or darknet .weights")
    ap.add_argument("--cutoff", type=COUNT, help="load .weights only for layers below this index")
    ap.add_argument("--img-size", type=IMG_SIZE, help="square input size (default: the cfg's height)")
    ap.add_argument("--layers", action="store_true", help="print the per-layer table")
    ap.add_argument("--forward", action="store_true", help="also run one forward pass and time it")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    if args.weights and not args.cutoff:
        opened = open_checkpoint(args.weights, args.cfg)
        model, trained = opened.model.eval(), opened.img_size
    else:  # a cfg alone, or darknet weights read up to --cutoff
        model, trained = load_model(args.weights, args.cfg, cutoff=args.cutoff).eval(), None
    size = resolve_img_size(args.img_size, trained, model)
    s = summarize(model, size)
    if args.layers:
        print(s.table())
    print(f"{model.cfg.source}: {s.line()}")
    strides = ", ".join(f"{v:g}" for v in model.strides(size))
    print(f"heads: {len(model.heads)} at strides {strides}; classes: {model.cfg.classes}")
    if args.forward:
        x = torch.rand(1, model.cfg.net["channels"], size, size)
        with torch.no_grad():
            t = time.perf_counter()
            dets, _ = model(x)
            ms = (time.perf_counter() - t) * 1e3
        print(f"forward: {tuple(dets.shape)} detections tensor in {ms:.1f} ms (CPU, batch 1)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
