"""Every pruning method on one sparse-trained checkpoint: size, accuracy before/after pruning and after
fine-tuning, and ONNX Runtime CPU latency, in one table; then the wall time of pruning yolov4.

    .venv/bin/python train.py --data shapes-hard -sr --s 2 --prune 1 --sr-schedule local --sr-decay-at 0 \\
        --sr-keep 0.4 --weights runs/train/exp/weights/last.pt --epochs 2 --name sparse
    .venv/bin/python -m bench.prune_methods --weights runs/train/sparse/weights/last.pt \\
        --finetune-epochs 4                                            # --data: shapes-hard by default

Each channel method gets the smallest ``--percent`` on a 0.05 grid that removes at least
``--target`` of the parameters (layer pruning: the fewest residual blocks, all of them if even that is
short); layer_channel removes half the blocks and then searches the slim percent. Fine-tuning
starts from the re-calibrated model with ``data/hyp.finetune.yaml`` (Adam at 5e-5, no warm-up). Latency is the
median of ``--runs`` batch-1 runs of the exported ONNX (float, BN folded by onnxruntime) at the
checkpoint's size; ``latency ratio / GFLOPs ratio`` is 1.0 when time falls exactly with compute.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import BENCH_DATA, finetune
from models.darknet import Darknet
from models.io import load_checkpoint, load_model
from models.onnx import export_onnx, ort_session
from models.summary import latencies, summarize
from prune import cli
from prune.blocks import residual_blocks
from prune.methods import METHODS as REGISTRY
from utils.cli import COUNT, COUNT0, IMG_SIZE, SHARE_BELOW_1, Parser
from utils.files import new_run_dir
from utils.outputs import atomic_write
from utils.torch_utils import tame_random_weights

METHODS = list(REGISTRY)


def params(model: Darknet) -> int:
    return sum(p.numel() for p in model.parameters())


def setting(model: Darknet, method: str, target: float) -> list[str]:
    """The script flags of the mildest setting that removes ``target`` of the parameters."""
    def small_enough(**kw) -> bool:
        pruned, _ = cli.apply_method(model, method, compensate=False, **kw)
        return params(pruned) <= (1 - target) * params(model)

    n_blocks = len(residual_blocks(model.cfg))
    if method == "layer":
        k = next((k for k in range(1, n_blocks + 1) if small_enough(shortcuts=k)), n_blocks)
        return ["--shortcuts", str(k)]
    extra = {"shortcuts": max(1, n_blocks // 2)} if method == "layer_channel" else {}
    grid = [round(p, 2) for p in np.arange(0.05, 0.96, 0.05)]
    percent = next((p for p in grid if small_enough(percent=p, **extra)), grid[-1])
    flags = ["--percent", f"{percent:.2f}"]
    return flags + (["--shortcuts", str(extra["shortcuts"])] if extra else [])


def onnx_latency(model: Darknet, path: Path, img_size: int, runs: int) -> float:
    export_onnx(model, path, img_size)
    sess = ort_session(path)
    x = np.random.default_rng(0).random((1, 3, img_size, img_size), dtype=np.float32)
    name = sess.get_inputs()[0].name
    return latencies([lambda: sess.run(None, {name: x})], runs)[0]


def methods_table(a: argparse.Namespace, out: Path) -> list[dict]:
    meta = load_checkpoint(a.weights)["meta"]
    model = load_model(a.weights).eval()
    img = a.img_size or meta.get("img_size") or model.cfg.net["height"]
    base_gflops = summarize(model, img).gflops
    base_latency = onnx_latency(model, out / "unpruned.onnx", img, a.runs)
    rows = []
    for method in a.methods:
        flags = setting(model, method, a.target)
        folder = out / method
        common = ["--weights", a.weights, "--data", a.data, "--img-size", str(img), *flags]
        report = recal = cli.main(method, [*common, "--output", str(folder / "compensated")])
        final = folder / "compensated"
        if a.recalibrate:
            final = folder / "recalibrated"
            recal = cli.main(method, [*common, "--output", str(final), "--recalibrate", str(a.recalibrate)])
        latency = onnx_latency(load_model(final / "pruned.pt").eval(), final / "pruned.onnx", img, a.runs)
        ft50 = ft = None
        if a.finetune_epochs:
            tuned = finetune(final / "pruned.pt", a.data, a.finetune_epochs, out, f"{method}-ft",
                             img_size=[img])
            ft50, ft = tuned.map50, tuned.map
        b, p, r = report["before"], report["after"], recal["after"]
        gflops_ratio = p["gflops"] / base_gflops
        rows.append({"method": method, "flags": " ".join(flags), "params_before": b["params"],
                     "params_after": p["params"], "gflops_before": b["gflops"], "gflops_after": p["gflops"],
                     "map50_before": b["map50"], "map_before": b["map"], "map50_pruned": p["map50"],
                     "map_pruned": p["map"], "map50_recal": r["map50"], "map_recal": r["map"],
                     "map50_ft": ft50, "map_ft": ft,
                     "ort_ms_before": base_latency, "ort_ms_after": latency,
                     "latency_over_gflops": (latency / base_latency) / gflops_ratio})
        atomic_write(out / "methods.json", json.dumps(rows, indent=2))
    return rows


def print_methods(rows: list[dict], epochs: int) -> None:
    def f(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    def stages(r: dict, key: str) -> str:
        return " / ".join(f(r[f"{key}_{s}"]) for s in ("before", "pruned", "recal", "ft"))

    print(f"\n| method | setting | params M (ratio) | GFLOPs (ratio) "
          f"| mAP@0.5 before / pruned / recalibrated / +{epochs} ep "
          f"| mAP@0.5:0.95 before / pruned / recalibrated / +{epochs} ep "
          f"| ORT ms before / after | latency/GFLOPs ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        cells = [r["method"], f"`{r['flags']}`",
                 f"{r['params_after'] / 1e6:.3f} ({r['params_after'] / r['params_before']:.2f})",
                 f"{r['gflops_after']:.3f} ({r['gflops_after'] / r['gflops_before']:.2f})",
                 stages(r, "map50"), stages(r, "map"),
                 f"{r['ort_ms_before']:.1f} / {r['ort_ms_after']:.1f}", f"{r['latency_over_gflops']:.2f}"]
        print("| " + " | ".join(cells) + " |")


def wall_times(cfg: str, img_size: int = 64) -> list[dict]:
    """Seconds each method takes to decide and build the pruned model of ``cfg`` (tame weights)."""
    model = tame_random_weights(Darknet(cfg), img_size=img_size)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g))
    print(f"\npruning wall time, {cfg} ({params(model) / 1e6:.1f} M parameters), percent 0.5 / 2 blocks:")
    print("| method | seconds | parameters after (ratio) |")
    print("| --- | ---: | ---: |")
    has_blocks = bool(residual_blocks(model.cfg))
    rows = []
    for method in METHODS:
        if method in ("layer", "layer_channel") and not has_blocks:
            continue
        t = time.perf_counter()
        pruned, _ = cli.apply_method(model, method, percent=0.5, shortcuts=2)
        seconds = time.perf_counter() - t
        ratio = params(pruned) / params(model)
        print(f"| {method} | {seconds:.2f} | {params(pruned) / 1e6:.2f} M ({ratio:.2f}) |")
        rows.append({"method": f"{method}, {Path(cfg).name} (wall time)", "seconds": seconds,
                     "params_ratio": ratio})
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m bench.prune_methods",
                description=__doc__)
    ap.add_argument("--weights", help="sparse-trained .pt (omit to time yolov4 pruning only)")
    ap.add_argument("--data", default=BENCH_DATA, help="default: %(default)s")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--target", type=SHARE_BELOW_1, default=0.5, help="share of parameters to remove")
    ap.add_argument("--finetune-epochs", type=COUNT0, default=4)
    ap.add_argument("--recalibrate", type=COUNT0, default=20,
                    help="BN re-calibration batches after pruning (0: none); fine-tuning starts from it")
    ap.add_argument("--img-size", type=IMG_SIZE, default=None)
    ap.add_argument("--runs", type=COUNT, default=30, help="timed ONNX Runtime runs per model")
    ap.add_argument("--wall-time-cfg", default="cfg/yolov4.cfg")
    ap.add_argument("--project", default="runs/bench")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    torch.manual_seed(0)
    rows = []
    if a.weights:
        out = new_run_dir(a.project, "prune_methods")
        rows = methods_table(a, out)
        print_methods(rows, a.finetune_epochs)
        print(f"\nresults in {out}")
    return rows + wall_times(a.wall_time_cfg)


if __name__ == "__main__":
    main()
