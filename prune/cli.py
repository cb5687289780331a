"""What the six ``prune/*_prune.py`` scripts share: flags, loading, the engine call, the report, writing.

Each script names its method; :func:`main` does the rest. Outputs go to a new folder
``runs/prune/<method>`` (numbered, never an existing one) unless ``--output`` names a folder:
``pruned.cfg`` + ``pruned.weights`` (darknet, for darknet/OpenCV/tensorrtx), ``pruned.pt`` (this
project's checkpoint: ``train.py --weights pruned.pt`` fine-tunes it) and ``report.json``. Those four
are checked before any work: an input is never written over, an existing file only with --exist-ok.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models.darknet import Darknet
from models.io import load_checkpoint, load_model, save_checkpoint, save_darknet_weights
from models.summary import summarize
from prune.methods import apply_plan, method, plan
from utils.cli import BATCH, COUNT, COUNT0, FRACTION, IMG_SIZE, MULTIPLE, SHARE_BELOW_1, Parser, run_cli
from utils.errors import UserError
from utils.files import new_run_dir, next_run_dir
from utils.outputs import OutputPlan, atomic_write
from utils.torch_utils import median_ms, recalibrate_bn


def build_parser(name: str) -> argparse.ArgumentParser:
    m = method(name)
    p = Parser(prog=f"prune/{name}_prune.py",
               description=f"{name} pruning: {m.summary}. Writes a smaller cfg, darknet .weights and a .pt "
                           f"checkpoint.")
    p.add_argument("--weights", required=True, help=".pt checkpoint (sparse-trained), or darknet weights "
                                                    "with --cfg")
    p.add_argument("--cfg", default=None, help="cfg for darknet .weights")
    p.add_argument("--data", default=None, help=".data file: evaluate mAP before and after (and "
                                                "--recalibrate on its training split)")
    if m.channels:
        p.add_argument("--percent", type=SHARE_BELOW_1, default=0.5,
                       help="share of the candidate channels' |gamma| below the global threshold (0..1)")
        p.add_argument("--layer-keep", "--layer_keep", type=FRACTION, default=0.01,
                       help="each layer (residual chain) keeps at least this share of its channels")
    if m.round_widths:
        p.add_argument("--round-to", type=MULTIPLE, default=8, help="kept widths are multiples of this")
    if m.blocks:
        p.add_argument("--shortcuts", type=COUNT, default=2, help="residual blocks to remove")
    p.add_argument("--img-size", type=IMG_SIZE, default=None,
                   help="evaluation, GFLOPs and latency size (default: the checkpoint's, else the cfg's)")
    p.add_argument("--batch-size", type=BATCH, default=16)
    p.add_argument("--recalibrate", type=COUNT0, default=0, metavar="N",
                   help="re-estimate BN statistics of the pruned model on N training batches (needs --data)")
    p.add_argument("--no-compensate", action="store_true",
                   help="do not fold the constant output of removed channels into their consumers")
    p.add_argument("--latency-runs", type=COUNT, default=10, help="forward passes timed for CPU latency")
    p.add_argument("--output", default=None, help="output folder (default: a new runs/prune/<method>)")
    p.add_argument("--exist-ok", action="store_true", help="replace the outputs in an existing --output")
    return p


def parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    return build_parser(name).parse_args(argv)


@dataclass
class Measure:
    params: int
    gflops: float
    latency_ms: float
    map50: float | None = None
    map: float | None = None


def measure(model: Darknet, img_size: int, runs: int, loader=None, names=None) -> Measure:
    """Parameters, GFLOPs, fused CPU latency (batch 1, median) and, with a loader, mAP."""
    s = summarize(model, img_size)
    fused = Darknet(model.cfg)
    fused.load_state_dict(model.state_dict())
    fused = fused.eval().fuse()
    x = torch.rand(1, model.cfg.net["channels"], img_size, img_size)
    with torch.inference_mode():
        latency = median_ms(lambda: fused(x), runs, warmup=2)
    m = Measure(s.params, s.gflops, latency)
    if loader is not None:
        from utils.evaluate import evaluate

        r = evaluate(model, loader, names, verbose=False)
        m.map50, m.map = r.map50, r.map
    return m


def table(before: Measure, after: Measure, img_size: int) -> str:
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None or not b else f"{a / b:.3f}"

    rows = [("parameters (M)", before.params / 1e6, after.params / 1e6, ".3f"),
            (f"GFLOPs at {img_size}", before.gflops, after.gflops, ".3f"),
            ("mAP@0.5", before.map50, after.map50, ".4f"),
            ("mAP@0.5:0.95", before.map, after.map, ".4f"),
            ("CPU latency ms (batch 1, median)", before.latency_ms, after.latency_ms, ".1f")]
    out = [f"{'':<34}{'before':>10}{'after':>10}{'after/before':>14}"]
    for name, a, b, spec in rows:
        out.append(f"{name:<34}{fmt(a, spec):>10}{fmt(b, spec):>10}{ratio(b, a):>14}")
    return "\n".join(out)


def _loaders(data_path: str, img_size: int, batch: int, stride: int, need_train: bool):
    from utils.datasets import create_dataloader, read_data_file

    data = read_data_file(Path(data_path))
    val, _ = create_dataloader(data.split("valid"), data.classes, img_size, batch, stride, rect=True,
                               need_boxes=True)
    train = None
    if need_train:
        train, _ = create_dataloader(data.split("train"), data.classes, img_size, batch, stride,
                                     shuffle=True, seed=0, verbose=False)
    return data, val, train


def apply_method(model: Darknet, name: str, percent: float = 0.5, layer_keep: float = 0.01,
                 round_to: int = 8, shortcuts: int = 2, compensate: bool = True
                 ) -> tuple[Darknet, list[str]]:
    """Prune ``model`` with the registered method ``name``: the pruned model and lines saying what went."""
    p = plan(model, name, percent, layer_keep, round_to, shortcuts)
    return apply_plan(model, p, compensate), p.notes()


def main(name: str, argv: list[str] | None = None) -> dict:
    a = parse_args(name, argv)
    weights = Path(a.weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    meta = load_checkpoint(weights)["meta"] if weights.suffix == ".pt" else {}
    model = load_model(weights, a.cfg).eval()
    img_size = a.img_size or meta.get("img_size") or model.cfg.net["height"]
    if img_size % model.max_stride:
        raise UserError(f"--img-size {img_size}: must be a multiple of {model.max_stride}")
    if a.recalibrate and not a.data:
        raise UserError("--recalibrate needs --data (its training images)")
    loader = train_loader = names = None
    if a.data:
        data, loader, train_loader = _loaders(a.data, img_size, a.batch_size, model.max_stride,
                                              bool(a.recalibrate))
        names = data.names
        if data.classes != model.cfg.classes:
            raise UserError(f"{weights}: the model predicts {model.cfg.classes} classes, {data.path} has "
                            f"{data.classes}")
    out_dir = Path(a.output) if a.output else next_run_dir("runs/prune", name)
    paths = {k: out_dir / f"pruned.{k}" for k in ("cfg", "weights", "pt")}
    paths["report"] = out_dir / "report.json"
    plan = OutputPlan([weights, a.cfg, a.data], a.exist_ok)
    for p in paths.values():
        plan.add(p)
    plan.check()  # before the work: a refused run neither prunes nor writes

    before = measure(model, img_size, a.latency_runs, loader, names)
    pruned, notes = apply_method(model, name, getattr(a, "percent", 0.5), getattr(a, "layer_keep", 0.01),
                                 getattr(a, "round_to", 8), getattr(a, "shortcuts", 2), not a.no_compensate)
    if a.recalibrate:
        batches = (imgs.float() / 255 for k, (imgs, *_) in zip(range(a.recalibrate), train_loader))
        n = recalibrate_bn(pruned, batches)
        notes.append(f"BN statistics re-estimated on {n} training batches")
    pruned.eval()
    after = measure(pruned, img_size, a.latency_runs, loader, names)

    if not a.output:  # made only now, so a refused or failed run leaves no empty folder
        out_dir = new_run_dir("runs/prune", name)
        paths = {k: out_dir / p.name for k, p in paths.items()}
    atomic_write(paths["cfg"], pruned.cfg_text)
    save_darknet_weights(pruned, paths["weights"])
    report = {"method": name, "source": str(weights), "img_size": img_size, "notes": notes,
              "options": {k: v for k, v in vars(a).items()},
              "before": vars(before), "after": vars(after),
              "widths": {str(i): [model.cfg.layers[i]["filters"], b["filters"]]
                         for i, b in enumerate(pruned.cfg.layers)
                         if b.type == "convolutional" and i < len(model.cfg.layers)
                         and not method(name).blocks}}
    save_checkpoint(paths["pt"], pruned, names=meta.get("names", names), img_size=img_size,
                    prune={k: v for k, v in report.items() if k != "widths"})
    atomic_write(paths["report"], json.dumps(report, indent=2))
    for line in notes:
        print(line)
    print(table(before, after, img_size))
    print(f"wrote {paths['cfg']}, {paths['weights']}, {paths['pt']} and {paths['report']}")
    return report


def script(name: str) -> int:
    """Entry point of ``prune/<name>_prune.py``."""
    return run_cli(lambda argv: main(name, argv), sys.argv[1:])
