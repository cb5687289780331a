"""The pipeline's report: what each stage did to accuracy, size and speed, measured in one run.

Every stage with a checkpoint is evaluated on the validation split at the recipe's size (``test.py``'s
thresholds), summarised (parameters, GFLOPs) and timed on the CPU, batch 1: in PyTorch (the fused
model; a quantized one runs its fake-quant graph) and in onnxruntime (the float ONNX, or the INT8
Q/DQ ONNX of a quantized checkpoint that has one). One runtime after the other, all its models are
timed in alternation, round after round, so drift hits each the same, with denormals flushed to zero
(as deployment runtimes do); each figure is a median and every ratio is to the first stage.
Writes ``report.json``, ``report.md`` and the plots into the run folder's ``report/``.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.darknet import Darknet
from models.io import load_model
from models.summary import latencies, torch_call
from pipeline.recipe import Recipe
from pipeline.runner import StageRecord
from prune.methods import PruneMethod
from prune.sparsity import SparsityOptions
from stages.train import TrainJob
from utils.outputs import atomic_write, save_figure

GAMMA_PLOT, CHANNEL_PLOT = "gamma.png", "channels.png"
GFLOPS_PLOT, LATENCY_PLOT = "accuracy_vs_gflops.png", "accuracy_vs_latency.png"


@dataclass
class Row:
    stage: str
    run: str
    checkpoint: str
    map50: float
    map: float
    params: int
    gflops: float
    file_mb: float  # the model as a checkpoint without training state (cfg + tensors)
    bits: int  # weight bits of the deployed model (32: float)
    torch_ms: float | None = None
    ort_ms: float | None = None
    ort_file: str = ""  # the ONNX that was timed, or why there is none
    seconds: float = 0.0  # the stage's wall time

    @property
    def deployed_mb(self) -> float:
        return self.params * self.bits / 8 / 1e6


def _timers(model: Darknet, onnx_path: Path, size: int) -> tuple[Callable, Callable | None, str]:
    """(PyTorch call, onnxruntime call or None, the ONNX timed or why none) for one checkpoint."""
    from models.onnx import export_onnx, ort_session
    from quant.qdq import export_int8_onnx, int8_problems

    run_torch = torch_call(model, size)
    if model.quant_config is None:
        fused = Darknet(model.cfg)
        fused.load_state_dict(model.state_dict())
        export_onnx(fused.fuse(), onnx_path, size, atol=1e-3)  # only timed here; export.py checks to 1e-4
    else:
        problems = int8_problems(model)
        if problems:
            return run_torch, None, "no INT8 ONNX: " + "; ".join(problems)
        onnx_path = onnx_path.with_suffix(".int8.onnx")
        export_int8_onnx(model, onnx_path, size)
    sess = ort_session(onnx_path)
    name = sess.get_inputs()[0].name
    feed = torch.rand(1, model.cfg.net["channels"], size, size, generator=torch.Generator().manual_seed(0))
    return run_torch, lambda: sess.run(None, {name: feed.numpy()}), str(onnx_path)


def _checkpoint_mb(model: Darknet) -> float:
    """Megabytes of the model saved as cfg + tensors (a train.py last.pt also holds the optimizer)."""
    from models.cfg import write_cfg

    buf = io.BytesIO()
    torch.save({"cfg": write_cfg(model.cfg), "model": model.state_dict()}, buf)  # into a temporary buffer
    return buf.tell() / 1e6


def measure(records: list[StageRecord], recipe: Recipe, out: Path, runs: int = 30, warmup: int = 3
            ) -> list[Row]:
    """One row per stage with a checkpoint (an export stage adds files, not a row)."""
    from models.summary import summarize
    from utils.datasets import create_dataloader, read_data_file, resolve_data
    from utils.evaluate import evaluate

    size = recipe.img_size
    data = read_data_file(resolve_data(recipe.data))
    loaders: dict[int, object] = {}
    rows, torch_calls, ort_calls = [], [], []
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    for rec in records:
        if rec.checkpoint is None:
            continue
        model = load_model(rec.checkpoint).eval()
        stride = model.max_stride
        if stride not in loaders:
            loaders[stride], _ = create_dataloader(data.split("valid"), data.classes, size, 16, stride,
                                                   rect=True, workers=0)
        result = evaluate(model, loaders[stride], data.names, verbose=False)
        s = summarize(model, size)
        bits = model.quant_config.spec.w_bits if model.quant_config else 32
        row = Row(rec.name, rec.run, str(rec.checkpoint), result.map50, result.map, s.params, s.gflops,
                  _checkpoint_mb(model), bits, seconds=rec.seconds)
        run_torch, run_ort, row.ort_file = _timers(load_model(rec.checkpoint).eval(), out / "onnx" /
                                                   f"{rec.name}.onnx", size)
        torch_calls.append(run_torch)
        ort_calls.append(run_ort)
        rows.append(row)
        print(f"{rec.name}: mAP@0.5 {row.map50:.4f} mAP@0.5:0.95 {row.map:.4f}, {row.params / 1e6:.3f} M "
              f"parameters, {row.gflops:.3f} GFLOPs")
    # one runtime at a time (their thread pools would compete), its models in alternation
    for row, ms in zip(rows, latencies(torch_calls, runs, warmup)):
        row.torch_ms = ms
    timed = [(row, call) for row, call in zip(rows, ort_calls) if call is not None]
    for (row, _), ms in zip(timed, latencies([call for _, call in timed], runs, warmup)):
        row.ort_ms = ms
    return rows


# -------------------------------------------------------------------- plots
def _gammas(checkpoint: str | Path, method: PruneMethod) -> np.ndarray:
    model = load_model(checkpoint)
    return torch.cat([model.layers[c].bn.weight.detach().abs().flatten()
                      for c in method.penalized_convs(model.cfg)]).numpy()


def _sparsity(record: StageRecord) -> SparsityOptions | None:
    """The sparse-training options of a training stage (None for other stages or without -sr)."""
    if record.run != "train":
        return None
    opts = TrainJob.from_mapping(record.options, f"stage '{record.name}'").sparsity
    return opts if opts.sr else None


def _conv_widths(checkpoint: str | Path) -> list[int]:
    model = load_model(checkpoint)
    return [b["filters"] for b in model.cfg.layers if b.type == "convolutional"]


def plots(rows: list[Row], records: list[StageRecord], out: Path) -> list[str]:
    """The four figures (those that apply to the recipe); returns their file names."""
    from utils.plots import plot_gamma_histograms, pyplot

    plt = pyplot()
    made = []
    ckpt = {r.stage: r.checkpoint for r in rows}
    for file, xkey, xlabel in ((GFLOPS_PLOT, ("gflops",), "GFLOPs"),
                               (LATENCY_PLOT, ("torch_ms", "ort_ms"), "CPU latency, ms (batch 1, median)")):
        fig, axes = plt.subplots(1, len(xkey), figsize=(5.5 * len(xkey), 4), squeeze=False)
        for ax, key in zip(axes[0], xkey):
            pts = [(getattr(r, key), r) for r in rows if getattr(r, key) is not None]
            for metric, marker in (("map50", "o"), ("map", "s")):
                ax.plot([x for x, _ in pts], [getattr(r, metric) for _, r in pts], marker, linestyle=":",
                        label="mAP@0.5" if metric == "map50" else "mAP@0.5:0.95")
            for x, r in pts:
                ax.annotate(r.stage, (x, r.map50), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel({"torch_ms": "PyTorch ", "ort_ms": "onnxruntime "}.get(key, "") + xlabel)
            ax.set_ylabel("mAP")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / file, dpi=110)
        plt.close(fig)
        made.append(file)
    sparse = next((r for r in records if _sparsity(r) and r.source in ckpt), None)
    if sparse is not None:
        method = _sparsity(sparse).method
        plot_gamma_histograms([(f"before ({sparse.source})", _gammas(ckpt[sparse.source], method)),
                               (f"after ({sparse.name})", _gammas(sparse.checkpoint, method))],
                              out / GAMMA_PLOT, log=True)
        made.append(GAMMA_PLOT)
    pruned = [r for r in records if r.run == "prune" and r.source in ckpt]
    if pruned:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        first = pruned[0]
        before = _conv_widths(ckpt[first.source])
        ax.bar(range(len(before)), before, color="0.75", label=f"before ({first.source})")
        for r in pruned:
            after = _conv_widths(r.checkpoint)
            ax.bar(range(len(after)), after, width=0.5, label=f"after ({r.name})")
        ax.set_xlabel("convolution (in cfg order)")
        ax.set_ylabel("output channels")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / CHANNEL_PLOT, dpi=110)
        plt.close(fig)
        made.append(CHANNEL_PLOT)
    return made


# -------------------------------------------------------------------- tables
COLUMNS = (("map50", ".3f", 1), ("map", ".3f", 1), ("params", ".3f", 1e6), ("gflops", ".3f", 1),
           ("file_mb", ".2f", 1), ("deployed_mb", ".2f", 1), ("torch_ms", ".1f", 1), ("ort_ms", ".1f", 1))


def _ratio_value(v: float | None, base: float | None) -> float | None:
    return None if v is None or not base else v / base


def _ratio(v: float | None, base: float | None) -> str:
    r = _ratio_value(v, base)
    return "" if r is None else f" ({r:.2f}×)"


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(rows: list[Row], records: list[StageRecord], info: dict, figures: list[str]) -> str:
    base = rows[0]
    lines = [f"# Compression report: {info['name']}", "",
             f"Recipe `{info['recipe']}`, {info['date']}, {info['machine']}. Every figure is measured on "
             f"the validation split ({info['data']}) at {info['img_size']}×{info['img_size']}; ratios are to "
             f"`{base.stage}`. Latency: CPU, batch 1, median of {info['runs']} runs, the models of "
             f"one runtime in alternation, denormals flushed to zero. Pipeline wall time "
             f"{info['seconds'] / 60:.1f} min.", "",
             "| stage | mAP@0.5 | mAP@0.5:0.95 | parameters M | GFLOPs | checkpoint MB | "
             "deployed weights MB | "
             "PyTorch ms | onnxruntime ms | stage time s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = [f"{r.stage} ({r.run})"]
        for key, spec, scale in COLUMNS:
            v, b = getattr(r, key), getattr(base, key)
            bits = f" at {r.bits} bits" if key == "deployed_mb" else ""
            cells.append(f"{_fmt(v and v / scale, spec)}{_ratio(v, b)}{bits}")
        cells.append(f"{r.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "- checkpoint MB: the model as cfg + tensors, without training state (a quantized one "
                  "keeps "
                  "float weights and its scales); deployed weights MB: parameters × weight bits / 8.",
              "- onnxruntime times the float ONNX, or the INT8 Q/DQ ONNX of a quantized checkpoint: "]
    lines += [f"  - {r.stage}: {r.ort_file}" for r in rows]
    lines += ["", "## Stages", ""]
    for rec in records:
        what = "given (`--weights`)" if rec.given else f"`{rec.command}`"
        skipped = ", skipped: done earlier" if rec.skipped else ""
        lines.append(f"- **{rec.name}** ({rec.seconds:.0f} s{skipped}): {what}")
    exports = [p for rec in records for p in rec.outputs]
    if exports:
        lines += ["", "## Exports", "", "| file | MB |", "| --- | ---: |"]
        for p in exports:
            files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
            size = sum(f.stat().st_size for f in files)
            lines.append(f"| {p} | {size / 1e6:.2f} |")
    if figures:
        lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write(records: list[StageRecord], recipe: Recipe, root: Path, seconds: float, runs: int = 30) -> Path:
    """Measure every stage and write ``report/report.{md,json}`` and the plots; returns the .md path."""
    from utils.datasets import resolve_data

    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(records, recipe, out, runs)
    figures = plots(rows, records, out)
    info = {"name": root.name, "recipe": str(recipe.path),
            "data": recipe.data or "the built-in shapes benchmark",
            "data_file": str(resolve_data(recipe.data)),
            "img_size": recipe.img_size, "runs": runs, "seconds": round(seconds, 1),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"}
    atomic_write(out / "report.json", json.dumps(
        {**info, "stages": [{**asdict(r), "deployed_mb": r.deployed_mb} for r in rows],
         "ratios": {r.stage: {k: _ratio_value(getattr(r, k), getattr(rows[0], k)) for k, _, _ in COLUMNS}
                    for r in rows},
         "exports": [str(p) for rec in records for p in rec.outputs], "figures": figures}, indent=2))
    md = out / "report.md"
    atomic_write(md, markdown(rows, records, info, figures))
    return md
