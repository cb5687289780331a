"""What the six ``prune/*_prune.py`` scripts share: flags, loading, the engine call, the report, writing.

Each script names its method; :func:`main` does the rest: its flags are :class:`PruneOptions`, and
:func:`run` is the pruning stage a compression recipe runs. Outputs go to a new folder
``runs/prune/<method>`` (numbered, never an existing one) unless ``--output`` names a folder:
``pruned.cfg`` + ``pruned.weights`` (darknet, for darknet/OpenCV/tensorrtx), ``pruned.pt`` (this
project's checkpoint: ``train.py --weights pruned.pt`` fine-tunes it) and ``report.json``. Those four
are checked before any work: an input is never written over, an existing file only with --exist-ok.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.cfg import ModelCfg, read_cfg
from models.darknet import Darknet
from models.io import open_checkpoint, resolve_img_size, save_checkpoint, save_darknet_weights
from models.summary import measure, ratio_spread
from prune.methods import apply_plan, method, plan
from utils.cli import (
    BATCH,
    COUNT,
    COUNT0,
    FRACTION,
    IMG_SIZE,
    MULTIPLE,
    SHARE_BELOW_1,
    from_namespace,
    given_flags,
    option,
    options_parser,
    run_cli,
    values_from_mapping,
)
from utils.errors import UserError
from utils.evaluate import evaluate
from utils.files import new_run_dir, next_run_dir
from utils.outputs import OutputPlan, atomic_write
from utils.results import StageResult
from utils.torch_utils import recalibrate_bn


@dataclass
class PruneOptions:
    """The flags of ``prune/<method>_prune.py`` (``method`` is the script's, not a flag)."""
    method: str = "normal"
    weights: str = option("", "--weights", required=True,
                          help=".pt checkpoint (sparse-trained), or darknet weights with --cfg")
    cfg: str = option("", "--cfg", help="cfg for darknet .weights")
    data: str = option("", "--data", help=".data file: evaluate mAP before and after (and --recalibrate on "
                                          "its training split)")
    percent: float = option(0.5, "--percent", type=SHARE_BELOW_1,
                            help="share of the candidate channels' |gamma| below the global threshold "
                                 "(0..1)")
    layer_keep: float = option(0.01, "--layer-keep", "--layer_keep", type=FRACTION,
                               help="each layer (residual chain) keeps at least this share of its channels")
    round_to: int | None = option(None, "--round-to", type=MULTIPLE,
                                  help="kept widths are rounded up to multiples of this (default: 8 for "
                                       "regular, 16 for the other channel methods; 1: no rounding)")
    widths_from: str = option("", "--widths-from", metavar="CFG",
                              help="give every conv the width it has in this cfg (a cut of the same network, "
                                   "e.g. one timed with bench.speed), keeping its best channels; replaces "
                                   "--percent, --layer-keep and --round-to")
    shortcuts: int = option(2, "--shortcuts", "--shortcut", type=COUNT, help="residual blocks to remove")
    img_size: int | None = option(None, "--img-size", type=IMG_SIZE,
                                  help="evaluation, GFLOPs and latency size (default: the checkpoint's, else "
                                       "the cfg's)")
    batch_size: int = option(16, "--batch-size", type=BATCH)
    recalibrate: int = option(0, "--recalibrate", type=COUNT0, metavar="N",
                              help="re-estimate BN statistics of the pruned model on N training batches "
                                   "(needs --data)")
    no_compensate: bool = option(False, "--no-compensate",
                                 help="do not fold the constant output of removed channels into their "
                                      "consumers")
    latency_runs: int = option(10, "--latency-runs", type=COUNT, help="forward passes timed for CPU latency")
    output: str = option("", "--output", help="output folder (default: a new runs/prune/<method>)")
    exist_ok: bool = option(False, "--exist-ok", help="replace the outputs in an existing --output")


def applies(name: str) -> Callable[[str], bool]:
    """Which flags method ``name`` has: the channel settings (``--percent``, ``--layer-keep``,
    ``--round-to``) only for methods that cut channels, ``--shortcuts`` only for block removal."""
    m = method(name)
    needs = {"percent": m.channels, "layer_keep": m.channels, "round_to": m.channels,
             "widths_from": m.takes_widths, "shortcuts": m.blocks}
    return lambda field_name: needs.get(field_name, True)


def build_parser(name: str) -> argparse.ArgumentParser:
    description = (f"{name} pruning: {method(name).summary}. Writes a smaller cfg, darknet .weights and a "
                   f".pt checkpoint.")
    return options_parser(f"prune/{name}_prune.py", description, PruneOptions, only=applies(name))


def parse(name: str, argv: list[str] | None) -> PruneOptions:
    return dataclasses.replace(from_namespace(PruneOptions, build_parser(name).parse_args(argv)), method=name)


def from_mapping(name: str, mapping: Mapping[str, Any], where: str) -> PruneOptions:
    """A recipe stage's options for method ``name``, each checked as its flag is."""
    values = values_from_mapping([PruneOptions], mapping, where, f"prune/{name}_prune.py", applies(name))
    return PruneOptions(method=name, **values[PruneOptions])


@dataclass
class Measure:
    params: int
    gflops: float
    latency_ms: float
    map50: float | None = None
    map: float | None = None
    latency_samples: tuple[float, ...] = ()


def apply_method(model: Darknet, name: str, percent: float = 0.5, layer_keep: float = 0.01,
                 round_to: int | None = None, shortcuts: int = 2, compensate: bool = True,
                 widths: ModelCfg | None = None) -> tuple[Darknet, list[str]]:
    """Prune ``model`` with the registered method ``name``: the pruned model and lines saying what went."""
    p = plan(model, name, percent, layer_keep, round_to, shortcuts, widths)
    return apply_plan(model, p, compensate), p.notes()


def measure_pair(before: Darknet, after: Darknet, img_size: int, runs: int, loader=None, names=None
                 ) -> tuple[Measure, Measure]:
    """Parameters, GFLOPs and CPU latency of both models (timed in alternation) and, with a loader, mAP."""
    out = []
    for model, m in zip((before, after), measure([before, after], img_size, runs, warmup=2)):
        row = Measure(m.params, m.gflops, m.latency_ms, latency_samples=m.latency_samples)
        if loader is not None:
            r = evaluate(model, loader, names, verbose=False)
            row.map50, row.map = r.map50, r.map
        out.append(row)
    return out[0], out[1]


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
    if before.latency_samples and after.latency_samples:
        spread = ratio_spread(before.latency_samples, after.latency_samples)
        out.append(f"latency after/before per timed round: {spread}, {len(after.latency_samples)} rounds")
        if spread.wide:
            out.append("warning: the latency ratio varied more than 20 % between rounds (a busy machine?); "
                       "rerun with a larger --latency-runs on an idle machine before trusting it")
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


def run(o: PruneOptions) -> StageResult:
    """Prune, measure before and after, write the outputs; the result's value is the report."""
    widths = read_cfg(o.widths_from) if o.widths_from else None
    if widths is not None and (unused := given_flags(o, ["percent", "layer_keep", "round_to"])):
        raise UserError(f"{', '.join(unused)}: does nothing with --widths-from (the cfg gives every width)")
    if o.round_to is None and method(o.method).channels and widths is None:  # recorded as used
        o = dataclasses.replace(o, round_to=method(o.method).round_to)
    opened = open_checkpoint(o.weights, o.cfg or None)
    model, meta, weights = opened.model.eval(), opened.meta, opened.path
    img_size = resolve_img_size(o.img_size, opened.img_size, model)
    if o.recalibrate and not o.data:
        raise UserError("--recalibrate needs --data (its training images)")
    loader = train_loader = names = None
    if o.data:
        data, loader, train_loader = _loaders(o.data, img_size, o.batch_size, model.max_stride,
                                              bool(o.recalibrate))
        names = data.names
        if data.classes != model.cfg.classes:
            raise UserError(f"{weights}: the model predicts {model.cfg.classes} classes, {data.path} has "
                            f"{data.classes}")
    out_dir = Path(o.output) if o.output else next_run_dir("runs/prune", o.method)
    paths = {k: out_dir / f"pruned.{k}" for k in ("cfg", "weights", "pt")}
    paths["report"] = out_dir / "report.json"
    outputs = OutputPlan([weights, o.cfg, o.data, o.widths_from], o.exist_ok)
    for p in paths.values():
        outputs.add(p)
    outputs.check()  # before the work: a refused run neither prunes nor writes

    pruned, notes = apply_method(model, o.method, o.percent, o.layer_keep, o.round_to, o.shortcuts,
                                 not o.no_compensate, widths)
    if o.recalibrate:
        batches = (imgs.float() / 255 for k, (imgs, *_) in zip(range(o.recalibrate), train_loader))
        n = recalibrate_bn(pruned, batches)
        notes.append(f"BN statistics re-estimated on {n} training batches")
    pruned.eval()
    before, after = measure_pair(model, pruned, img_size, o.latency_runs, loader, names)

    if not o.output:  # made only now, so a refused or failed run leaves no empty folder
        out_dir = new_run_dir("runs/prune", o.method)
        paths = {k: out_dir / p.name for k, p in paths.items()}
    atomic_write(paths["cfg"], pruned.cfg_text)
    save_darknet_weights(pruned, paths["weights"])
    report = {"method": o.method, "source": str(weights), "img_size": img_size, "notes": notes,
              "options": dataclasses.asdict(o), "before": vars(before), "after": vars(after),
              "widths": {str(i): [model.cfg.layers[i]["filters"], b["filters"]]
                         for i, b in enumerate(pruned.cfg.layers)
                         if b.type == "convolutional" and i < len(model.cfg.layers)
                         and not method(o.method).blocks}}
    save_checkpoint(paths["pt"], pruned, names=meta.get("names", names), img_size=img_size,
                    prune={k: v for k, v in report.items() if k != "widths"})
    atomic_write(paths["report"], json.dumps(report, indent=2))
    for line in notes:
        print(line)
    print(table(before, after, img_size))
    print(f"wrote {paths['cfg']}, {paths['weights']}, {paths['pt']} and {paths['report']}")
    return StageResult(paths["pt"], [], report)


def main(name: str, argv: list[str] | None = None) -> dict:
    return run(parse(name, argv)).value


def script(name: str) -> int:
    """Entry point of ``prune/<name>_prune.py``."""
    return run_cli(lambda argv: main(name, argv), sys.argv[1:])
