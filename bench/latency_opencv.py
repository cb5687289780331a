"""CPU forward latency, batch 1: this project's PyTorch model against OpenCV DNN on the same
cfg and weights. Prints the median of repeated runs and the ratio measured in the same run.

    .venv/bin/python -m bench.latency_opencv                      # yolov3-tiny and yolov3 at 416
    .venv/bin/python -m bench.latency_opencv --cfgs cfg/yolov4-tiny.cfg --runs 50
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from bench.common import latency_parser
from models.cfg import write_cfg
from models.darknet import Darknet
from models.io import save_darknet_weights
from models.summary import latencies, torch_call
from utils.outputs import atomic_write
from utils.torch_utils import tame_random_weights


def bench_cfg(cfg_path: str, size: int, runs: int, warmup: int) -> dict[str, float]:
    model = tame_random_weights(Darknet(cfg_path), seed=0, img_size=64)
    image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, weights = Path(tmp) / "m.cfg", Path(tmp) / "m.weights"
        atomic_write(cfg, write_cfg(model.cfg))
        save_darknet_weights(model, weights)
        net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    names = net.getUnconnectedOutLayersNames()

    def opencv() -> object:
        net.setInput(image)
        return net.forward(names)

    x = torch.from_numpy(image)
    model.eval()

    @torch.inference_mode()
    def unfused() -> object:
        return model(x)

    times = latencies([opencv, unfused, torch_call(model, size)], runs, warmup)
    return dict(zip(("opencv", "torch", "torch_fused"), times))


def build_parser() -> argparse.ArgumentParser:
    return latency_parser("python -m bench.latency_opencv", __doc__,
                          ["cfg/yolov3-tiny.cfg", "cfg/yolov3.cfg"], runs=20, warmup=3)


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    print(f"CPU latency, batch 1, {args.img_size}x{args.img_size}, median of {args.runs} runs "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads; OpenCV {cv2.__version__})")
    print(f"{'cfg':<22}{'OpenCV ms':>11}{'torch ms':>10}{'fused ms':>10}{'torch/OpenCV':>14}"
          f"{'fused/OpenCV':>14}")
    rows = []
    for cfg in args.cfgs:
        r = bench_cfg(cfg, args.img_size, args.runs, args.warmup)
        rows.append({"cfg": Path(cfg).name, "opencv_ms": r["opencv"], "torch_ms": r["torch"],
                     "torch_fused_ms": r["torch_fused"], "fused_over_opencv": r["torch_fused"] / r["opencv"]})
        print(f"{Path(cfg).name:<22}{r['opencv']:>11.1f}{r['torch']:>10.1f}{r['torch_fused']:>10.1f}"
              f"{r['torch'] / r['opencv']:>14.2f}{r['torch_fused'] / r['opencv']:>14.2f}")
    return rows


if __name__ == "__main__":
    main()
