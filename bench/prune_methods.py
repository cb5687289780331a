"""Every pruning method on one sparse-trained checkpoint: size, accuracy before/after pruning and after
fine-tuning, and ONNX Runtime CPU latency, in one table; then the wall time of pruning yolov4.

    .venv/bin/python train.py --data shapes-hard -sr --s 2 --prune 1 --sr-schedule local --sr-decay-at 0 \\
        --sr-keep 0.4 --weights runs/train/exp/weights/last.pt --epochs 2 --name sparse
    .venv/bin/python -m bench.prune_methods --weights runs/train/sparse/weights/last.pt \\
        --finetune-epochs 4                                            # --data: shapes-hard by default

Each channel method gets the smallest ``--percent`` on a 0.05 grid that removes at least
``--target`` of the parameters (layer pruning: the fewest residual blocks, all of them if even that is
short); layer_channel removes half the blocks and then searches the slim percent. Fine-tuning
starts from the re-calibrated model with ``--hyp`` (default ``data/hyp.recover.yaml``, Adam at 5e-4, what the
default recipe fine-tunes with), and a control row fine-tunes the unpruned checkpoint alike. Latency is the
median of ``--runs`` batch-1 runs, the unpruned and the pruned model in turn, of the exported ONNX
(float, BN folded by onnxruntime; each session alone with onnxruntime's default threading, 3 rounds)
and of the fused PyTorch model (in alternation), at the checkpoint's size and at
``--latency-sizes`` (416); ``latency ratio / GFLOPs ratio`` is 1.0 when time falls exactly with
compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import BENCH_DATA, RECOVER_HYP, checked_hyp, finetune
from models.darknet import Darknet
from models.io import load_checkpoint, load_model
from models.onnx import export_onnx
from models.summary import latencies, ort_latencies, summarize, torch_call
from prune import cli
from prune.blocks import residual_blocks
from prune.methods import METHODS as REGISTRY
from utils.cli import COUNT, COUNT0, IMG_SIZE, SHARE_BELOW_1, Parser, run_cli
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


def speeds(before: Darknet, after: Darknet, sizes: list[int], runs: int, folder: Path) -> dict[int, dict]:
    """Batch-1 CPU milliseconds of the unpruned and the pruned model at each size, the two timed in
    turn: onnxruntime on the float ONNX (BN folded by onnxruntime; :func:`models.summary.ort_latencies`),
    PyTorch on the deployed model (fused, channels-last; ``Darknet.deploy``), in alternation."""
    result = {}
    for size in sizes:
        paths = [folder / f"{tag}-{size}.onnx" for tag in ("before", "after")]
        for model, path in zip((before, after), paths):
            export_onnx(model, path, size)
        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        ort = ort_latencies(paths, x, runs)
        pt = latencies([torch_call(before, size), torch_call(after, size)], runs)
        result[size] = {"ort_ms_before": ort[0], "ort_ms_after": ort[1],
                        "torch_ms_before": pt[0], "torch_ms_after": pt[1]}
    return result


def methods_table(a: argparse.Namespace, out: Path) -> list[dict]:
    meta = load_checkpoint(a.weights)["meta"]
    model = load_model(a.weights).eval()
    img = a.img_size or meta.get("img_size") or model.cfg.net["height"]
    base_gflops = summarize(model, img).gflops
    sizes = list(dict.fromkeys([img, *a.latency_sizes]))
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
        speed = speeds(model, load_model(final / "pruned.pt").eval(), sizes, a.runs, folder)
        ft50 = ft = None
        if a.finetune_epochs:
            tuned = finetune(final / "pruned.pt", a.data, a.finetune_epochs, out, f"{method}-ft",
                             img_size=[img], hyp=a.hyp)
            ft50, ft = tuned.map50, tuned.map
        b, p, r = report["before"], report["after"], recal["after"]
        gflops_ratio = p["gflops"] / base_gflops
        rows.append({"method": method, "flags": " ".join(flags), "params_before": b["params"],
                     "params_after": p["params"], "gflops_before": b["gflops"], "gflops_after": p["gflops"],
                     "map50_before": b["map50"], "map_before": b["map"], "map50_pruned": p["map50"],
                     "map_pruned": p["map"], "map50_recal": r["map50"], "map_recal": r["map"],
                     "map50_ft": ft50, "map_ft": ft,
                     "gflops_ratio": gflops_ratio, "speed": speed})
        atomic_write(out / "methods.json", json.dumps(rows, indent=2))
    if a.finetune_epochs:  # the unpruned model trained alike: what pruning costs at equal training
        tuned = finetune(Path(a.weights), a.data, a.finetune_epochs, out, "unpruned-ft", img_size=[img],
                         hyp=a.hyp)
        rows.append({"method": "unpruned (control)", "flags": "", "params_before": params(model),
                     "params_after": params(model), "gflops_before": base_gflops, "gflops_after": base_gflops,
                     **{k: None for k in ("map50_before", "map_before", "map50_pruned", "map_pruned",
                                          "map50_recal", "map_recal")},
                     "map50_ft": tuned.map50, "map_ft": tuned.map, "gflops_ratio": 1.0, "speed": {}})
        atomic_write(out / "methods.json", json.dumps(rows, indent=2))
    return rows


def print_methods(rows: list[dict], epochs: int) -> None:
    def f(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    def stages(r: dict, key: str) -> str:
        return " / ".join(f(r[f"{key}_{s}"]) for s in ("before", "pruned", "recal", "ft"))

    def ratio(t: dict, runtime: str) -> float:
        return t[f"{runtime}_ms_after"] / t[f"{runtime}_ms_before"]

    sizes = list(rows[0]["speed"]) if rows else []
    print(f"\n| method | setting | params M (ratio) | GFLOPs (ratio) "
          f"| mAP@0.5 before / pruned / recalibrated / +{epochs} ep "
          f"| mAP@0.5:0.95 before / pruned / recalibrated / +{epochs} ep | "
          + " | ".join(f"{s} px: onnxruntime ms before / after (ratio; ÷ GFLOPs ratio) | {s} px: PyTorch "
                       f"ratio" for s in sizes) + " |")
    print("| --- | --- | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * len(sizes))
    for r in rows:
        cells = [r["method"], f"`{r['flags']}`" if r['flags'] else "",
                 f"{r['params_after'] / 1e6:.3f} ({r['params_after'] / r['params_before']:.2f})",
                 f"{r['gflops_after']:.3f} ({r['gflops_ratio']:.2f})",
                 stages(r, "map50"), stages(r, "map")]
        for t in r["speed"].values():
            cells += [f"{t['ort_ms_before']:.1f} / {t['ort_ms_after']:.1f} ({ratio(t, 'ort'):.2f}; "
                      f"{ratio(t, 'ort') / r['gflops_ratio']:.2f})", f"{ratio(t, 'torch'):.2f}"]
        cells += ["", ""] * (len(sizes) - len(r["speed"]))  # the control is not timed
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
    ap.add_argument("--hyp", default=RECOVER_HYP, help="fine-tuning hyperparameters (default: %(default)s, "
                    "the default recipe's)")
    ap.add_argument("--recalibrate", type=COUNT0, default=20,
                    help="BN re-calibration batches after pruning (0: none); fine-tuning starts from it")
    ap.add_argument("--img-size", type=IMG_SIZE, default=None)
    ap.add_argument("--runs", type=COUNT, default=30, help="timed runs per model, runtime and size")
    ap.add_argument("--latency-sizes", type=IMG_SIZE, nargs="+", default=[416],
                    help="sizes timed besides the checkpoint's (default: %(default)s)")
    ap.add_argument("--wall-time-cfg", default="cfg/yolov4.cfg")
    ap.add_argument("--project", default="runs/bench")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    a.hyp = checked_hyp(a.hyp)
    torch.manual_seed(0)
    rows = []
    if a.weights:
        out = new_run_dir(a.project, "prune_methods")
        rows = methods_table(a, out)
        print_methods(rows, a.finetune_epochs)
        print(f"\nresults in {out}")
    return rows + wall_times(a.wall_time_cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))
