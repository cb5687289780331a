"""The pipeline's report: what each stage did to accuracy, size and speed, measured in one run.

Every stage with a checkpoint is evaluated on the validation split at the recipe's size (``test.py``'s
thresholds), summarised (parameters, GFLOPs) and timed on the CPU, batch 1: in PyTorch (the fused
model; a quantized one runs its fake-quant graph) and in onnxruntime (the float ONNX, or the INT8
Q/DQ ONNX of a quantized checkpoint that has one). One runtime after the other, all its models are
timed round after round, so drift hits each the same, with denormals flushed to zero (as deployment
runtimes do): PyTorch's in alternation, onnxruntime's sessions one at a time with its default
threading (:func:`models.summary.ort_latencies`). Each figure is a median and every ratio is to the
first stage.
Writes ``report.json``, ``report.md`` and the plots into the run folder's ``report/``. A path in the
report is relative to the run folder when the file is inside it, else relative to the project folder
when inside that, else as given (:func:`shown_path`), so a report reads the same on any machine.

``python -m pipeline.report RUN_FOLDER_OR_REPORT_JSON [OUT_DIR]`` rebuilds ``report.md`` and the two
accuracy plots from a ``report.json`` alone (:func:`render`), without measuring again.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from engine.options import REPO
from models.darknet import Darknet
from models.io import load_model
from models.profile import OTHER, layer_times, plot_layer_times
from models.summary import cpu_description, latencies, ort_latencies, torch_call
from pipeline.recipe import Recipe
from pipeline.runner import StageRecord
from prune.methods import PruneMethod
from prune.sparsity import SparsityOptions
from stages.train import TrainJob
from utils.errors import UserError
from utils.outputs import atomic_write, save_figure

GAMMA_PLOT, CHANNEL_PLOT = "gamma.png", "channels.png"
GFLOPS_PLOT, LATENCY_PLOT = "accuracy_vs_gflops.png", "accuracy_vs_latency.png"
LAYER_PLOT = "layer_latency.png"


def shown_path(path: str | Path, *bases: str | Path) -> str:
    """``path`` as a report writes it: relative to the first of ``bases`` (folders) that holds it, else as
    given. A relative ``path`` or base is taken from the current directory; links are followed only when
    the plain comparison fails (a run folder resolved on one side, not on the other)."""
    full = Path(os.path.abspath(path))
    for base in bases:
        b = Path(os.path.abspath(base))
        for f, d in ((full, b), (full.resolve(), b.resolve())):
            if f.is_relative_to(d):
                return f.relative_to(d).as_posix()
    return str(path)


def _shown_command(command: str) -> str:
    """A stage's command line with its absolute paths inside the project made relative to the project
    folder, where the command runs (the arguments are space-separated, as the runner writes them)."""
    return " ".join(shown_path(a, REPO) if os.path.isabs(a) else a for a in command.split(" "))


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
    float_source: str | None = None  # a quantized stage: the float stage it came from
    int8_target: str | None = None  # a quantized stage: the runtime its INT8 layout is for (trt, ort)
    seconds: float = 0.0  # the stage's wall time

    @property
    def deployed_mb(self) -> float:
        return self.params * self.bits / 8 / 1e6


def _timers(model: Darknet, onnx_path: Path, size: int) -> tuple[Callable, Path | None, str]:
    """(PyTorch call, the ONNX onnxruntime times or None, its path or why there is none) for one
    checkpoint."""
    from models.onnx import export_onnx
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
    return run_torch, onnx_path, str(onnx_path)


def _checkpoint_mb(model: Darknet) -> float:
    """Megabytes of the model saved as cfg + tensors (a train.py last.pt also holds the optimizer)."""
    from models.cfg import write_cfg

    buf = io.BytesIO()
    torch.save({"cfg": write_cfg(model.cfg), "model": model.state_dict()}, buf)  # into a temporary buffer
    return buf.tell() / 1e6


def measure(records: list[StageRecord], recipe: Recipe, out: Path, runs: int = 30, warmup: int = 3,
            show: Callable[[str | Path], str] = str) -> list[Row]:
    """One row per stage with a checkpoint (an export stage adds files, not a row); ``show`` writes the
    rows' paths (the checkpoint and the ONNX timed)."""
    from models.summary import summarize
    from utils.datasets import create_dataloader, read_data_file, resolve_data
    from utils.evaluate import evaluate

    size = recipe.img_size
    data = read_data_file(resolve_data(recipe.data))
    loaders: dict[int, object] = {}
    rows, torch_calls, ort_paths = [], [], []
    channels = 3  # the input channels of the models timed (one recipe: one input)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    for rec in records:
        if rec.checkpoint is None:
            continue
        model = load_model(rec.checkpoint).eval()
        stride, channels = model.max_stride, model.cfg.net["channels"]
        if stride not in loaders:
            loaders[stride], _ = create_dataloader(data.split("valid"), data.classes, size, 16, stride,
                                                   rect=True, workers=0)
        result = evaluate(model, loaders[stride], data.names, verbose=False)
        s = summarize(model, size)
        bits = model.quant_config.spec.w_bits if model.quant_config else 32
        row = Row(rec.name, rec.run, show(rec.checkpoint), result.map50, result.map, s.params, s.gflops,
                  _checkpoint_mb(model), bits, seconds=rec.seconds)
        onnx = out / "onnx" / f"{rec.name}.onnx"
        run_torch, ort_path, ort = _timers(load_model(rec.checkpoint).eval(), onnx, size)
        row.ort_file = show(ort) if ort_path is not None else ort  # the ONNX, or why there is none
        row.int8_target = model.quant_config.target if model.quant_config is not None else None
        torch_calls.append(run_torch)
        ort_paths.append(ort_path)
        rows.append(row)
        print(f"{rec.name}: mAP@0.5 {row.map50:.4f} mAP@0.5:0.95 {row.map:.4f}, {row.params / 1e6:.3f} M "
              f"parameters, {row.gflops:.3f} GFLOPs")
    sources = {rec.name: rec.source for rec in records}
    floats = {row.stage for row in rows if row.bits == 32}
    for row in rows:
        src = sources.get(row.stage)
        while row.bits != 32 and src is not None and src not in floats:
            src = sources.get(src)
        row.float_source = src if row.bits != 32 else None
    # one runtime at a time (their thread pools would compete): PyTorch's models in alternation,
    # then onnxruntime's sessions one at a time, round after round
    for row, ms in zip(rows, latencies(torch_calls, runs, warmup)):
        row.torch_ms = ms
    timed = [(row, path) for row, path in zip(rows, ort_paths) if path is not None]
    x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0)).numpy()
    for (row, _), ms in zip(timed, ort_latencies([path for _, path in timed], x, runs, warmup)):
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


def _label_points(ax, points: list[tuple[float, float, str, str]], fontsize: float = 7, gap: float = 5
                  ) -> None:
    """Name each point ``(x, y, text, colour)`` beside it, no two names overlapping: names that would
    overlap sideways (points at or near one x) stand in one column right of their points, in the order
    of their heights, spread apart where they would touch; a name moved off its point's side gets a
    thin line to it.
    The axis limits grow to hold the names. Lay out after ``tight_layout`` (it moves the axes)."""
    if not points:
        return
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72  # pixels per point
    probes = [ax.text(0, 0, text, fontsize=fontsize) for _, _, text, _ in points]
    sizes = [(b.width, b.height) for b in (t.get_window_extent(renderer) for t in probes)]
    for t in probes:
        t.remove()
    gap_px, n = gap * px, len(points)
    for attempt in range(4):  # growing the limits moves the points: lay out again on the new ones
        xy = ax.transData.transform([(x, y) for x, y, _, _ in points])
        where = np.zeros((n, 2))  # each name's left end, middle height (pixels)
        clusters: list[list[int]] = []
        right = -np.inf
        for i in sorted(range(n), key=lambda i: (xy[i, 0], -xy[i, 1])):
            if clusters and xy[i, 0] + gap_px < right:  # its name would start under the column's names
                clusters[-1].append(i)
            else:
                clusters.append([i])
            column = max(xy[j, 0] for j in clusters[-1]) + gap_px
            right = column + max(sizes[j][0] for j in clusters[-1]) + gap_px
        for cluster in clusters:
            column = max(xy[j, 0] for j in cluster) + gap_px
            order = sorted(cluster, key=lambda j: -xy[j, 1])
            ys = [xy[j, 1] for j in order]
            for _ in range(200):  # push apart the neighbours that touch, half each way
                moved = False
                for k in range(len(order) - 1):
                    need = (sizes[order[k]][1] + sizes[order[k + 1]][1]) / 2 + 1
                    overlap = need - (ys[k] - ys[k + 1])
                    if overlap > 0.01:
                        ys[k] += overlap / 2
                        ys[k + 1] -= overlap / 2
                        moved = True
                if not moved:
                    break
            for j, y in zip(order, ys):
                where[j] = column, y
        inverse = ax.transData.inverted()
        lo = inverse.transform([(where[j, 0], where[j, 1] - sizes[j][1] / 2) for j in range(n)])
        hi = inverse.transform([(where[j, 0] + sizes[j][0], where[j, 1] + sizes[j][1] / 2) for j in range(n)])
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        nx0, nx1 = min(x0, lo[:, 0].min()), max(x1, hi[:, 0].max() + (x1 - x0) * 0.02)
        ny0, ny1 = min(y0, lo[:, 1].min()), max(y1, hi[:, 1].max())
        if (nx0, nx1, ny0, ny1) == (x0, x1, y0, y1) or attempt == 3:  # the last layout fits these limits
            break
        ax.set_xlim(nx0, nx1)
        ax.set_ylim(ny0, ny1)
    for j, (x, y, text, colour) in enumerate(points):
        dx, dy = (where[j, 0] - xy[j, 0]) / px, (where[j, 1] - xy[j, 1]) / px
        moved = abs(dy) > 2 or dx > gap + 2  # a name beside its own point needs no line to it
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    color=colour, ha="left", va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 4}
                    if moved else None)


SERIES = (("map50", "mAP@0.5", "o", "tab:blue"), ("map", "mAP@0.5:0.95", "s", "tab:orange"))
ACCURACY_PLOTS = ((GFLOPS_PLOT, ("gflops",), "GFLOPs"),
                  (LATENCY_PLOT, ("torch_ms", "ort_ms"), "CPU latency, ms (batch 1, median)"))


def accuracy_plots(rows: list[Row], out: Path) -> list[str]:
    """Accuracy against GFLOPs and against latency (PyTorch, onnxruntime): one point per stage and metric,
    no lines (the stages are no sequence along these axes), every point named; returns the file names."""
    from matplotlib.lines import Line2D

    from utils.plots import pyplot

    plt = pyplot()
    made = []
    for file, xkeys, xlabel in ACCURACY_PLOTS:
        fig, axes = plt.subplots(1, len(xkeys), figsize=(6 * len(xkeys), 4.6), squeeze=False)
        for ax, key in zip(axes[0], xkeys):
            pts = [r for r in rows if getattr(r, key) is not None]
            for metric, _, marker, colour in SERIES:
                ax.plot([getattr(r, key) for r in pts], [getattr(r, metric) for r in pts], marker=marker,
                        linestyle="none", color=colour, markersize=6, alpha=0.85)
            ax.margins(x=0.08, y=0.08)
            ax.set_xlabel({"torch_ms": "PyTorch ", "ort_ms": "onnxruntime "}.get(key, "") + xlabel)
            ax.set_ylabel("mAP (validation split)")
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], marker=marker, linestyle="none", color=colour, label=label)
                   for _, label, marker, colour in SERIES]
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        for ax, key in zip(axes[0], xkeys):
            pts = [r for r in rows if getattr(r, key) is not None]
            _label_points(ax, [(getattr(r, key), getattr(r, metric), r.stage, colour)
                               for metric, _, _, colour in SERIES for r in pts])
        save_figure(fig, out / file, dpi=110)
        plt.close(fig)
        made.append(file)
    return made


def plots(rows: list[Row], records: list[StageRecord], out: Path) -> list[str]:
    """The four figures (those that apply to the recipe); returns their file names."""
    from utils.plots import plot_gamma_histograms, pyplot

    plt = pyplot()
    made = accuracy_plots(rows, out)
    ckpt = {r.name: r.checkpoint for r in records if r.checkpoint is not None}
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


def layer_profile(records: list[StageRecord], img_size: int, out: Path, runs: int = 20
                  ) -> tuple[list[str], dict]:
    """Where the time goes: per-layer CPU time of the model the first pruning stage started from and of
    the last pruned model (:mod:`models.profile`), drawn into ``layer_latency.png``. Returns the figure
    names and the data for report.json (empty without a pruning stage)."""
    ckpt = {r.name: r.checkpoint for r in records if r.checkpoint is not None}
    pruned = [r for r in records if r.run == "prune" and r.source in ckpt and r.checkpoint is not None]
    if not pruned:
        return [], {}
    first, last = pruned[0], pruned[-1]
    named = [(first.source, layer_times(load_model(ckpt[first.source]), img_size, runs)),
             (last.name, layer_times(load_model(last.checkpoint), img_size, runs))]
    plot_layer_times(named, out / LAYER_PLOT)
    return [LAYER_PLOT], {"runs": runs, "models": [{"stage": name, "rows": t.rows()} for name, t in named]}


def layer_markdown(profile: dict, top: int = 8) -> list[str]:
    """The layers that take the most onnxruntime time before pruning, with their share of the time and
    of the GFLOPs, before and after (the same layer index when pruning kept the layer count)."""
    (b_name, before), (a_name, after) = ((m["stage"], m["rows"]) for m in profile["models"])
    aligned = len(before) == len(after)
    after_by = {r["layer"]: r for r in after}

    def share(rows: list[dict], r: dict | None, key: str) -> str:
        total = sum(x[key] for x in rows)
        return "–" if r is None or not total else f"{r[key]:.2f} ({r[key] / total:.0%})"

    heavy = sorted(before, key=lambda r: -r["ort_ms"])[:top]
    lines = ["", "## Where the time goes", "",
             f"Per layer, CPU batch 1, median of {profile['runs']} runs: onnxruntime kernel time from its "
             f"profiler, PyTorch time from forward hooks on the deployed model (fused, channels-last); "
             f"`{b_name}` → `{a_name}`, the {top} layers that take the most onnxruntime time in `{b_name}` "
             f"(share of the model's total in brackets; `other` is layout reorders and box decoding). A "
             f"layer whose share of the time is well above its share of the GFLOPs is memory-bound or runs "
             f"an unfavourable width.", "",
             "| layer | type | GFLOPs | onnxruntime ms | PyTorch ms |", "| --- | --- | ---: | ---: | ---: |"]
    for r in heavy:
        a = after_by.get(r["layer"]) if aligned else None
        name = "other" if r["layer"] == OTHER else str(r["layer"])
        cells = [share(before, r, k) + " → " + share(after, a, k) for k in ("gflops", "ort_ms", "torch_ms")]
        lines.append(f"| {name} | {r['type']} | " + " | ".join(cells) + " |")
    return lines


# -------------------------------------------------------------------- tables
COLUMNS = (("map50", ".3f", 1), ("map", ".3f", 1), ("params", ".3f", 1e6), ("gflops", ".3f", 1),
           ("file_mb", ".2f", 1), ("deployed_mb", ".2f", 1), ("torch_ms", ".1f", 1), ("ort_ms", ".1f", 1))


LAYOUT_NOTES = {"ort": " (onnxruntime's layout: integer kernels)",
                "trt": " (TensorRT's layout, for a Jetson: onnxruntime runs its convs in float)"}


def _ratio_value(v: float | None, base: float | None) -> float | None:
    return None if v is None or not base else v / base


def _ratio(v: float | None, base: float | None) -> str:
    r = _ratio_value(v, base)
    return "" if r is None else f" ({r:.2f}×)"


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _rows(doc: dict) -> list[Row]:
    """The rows of a report.json."""
    names = {f.name for f in fields(Row)}
    return [Row(**{k: v for k, v in s.items() if k in names}) for s in doc["stages"]]


def _points(v: float, base: float) -> str:
    d = (base - v) * 100
    return f"{abs(d):.1f} points {'below' if d >= 0 else 'above'}"


def headline(doc: dict) -> list[str]:
    """The report's first lines: for each exported model, its speed in onnxruntime and its accuracy
    against the first stage (the model compression started from)."""
    rows = _rows(doc)
    base, by_stage = rows[0], {r.stage: r for r in rows}
    lines = []
    for e in doc.get("exported", []):
        r = by_stage.get(e["stage"])
        if r is None or r is base:
            continue
        kind = {"ort": "INT8 for onnxruntime", "trt": "INT8 in TensorRT's layout"}.get(r.int8_target,
                                                                                       "float")
        if r.ort_ms and base.ort_ms:
            speed = (f"{base.ort_ms / r.ort_ms:.1f}× as fast as `{base.stage}` in onnxruntime on this CPU "
                     f"({r.ort_ms:.1f} ms against {base.ort_ms:.1f} ms"
                     + ("; onnxruntime runs this layout's convs in float, TensorRT runs them in INT8)"
                        if r.int8_target == "trt" else ")"))
        else:
            speed = "not timed in onnxruntime"
        lines.append(f"- **`{r.stage}`** (exported by `{e['export']}`, {kind}): {speed}, "
                     f"{r.params / base.params:.2f}× the parameters, mAP@0.5 {r.map50:.3f} "
                     f"({_points(r.map50, base.map50)} `{base.stage}`) and mAP@0.5:0.95 {r.map:.3f} "
                     f"({_points(r.map, base.map)}).")
    return [*lines, ""] if lines else []


def _timing(doc: dict) -> str:
    """How the report's latencies were taken (reports from before onnxruntime's threads spun say so)."""
    if doc.get("ort_spinning"):
        return ("denormals flushed to zero; PyTorch's models in alternation, onnxruntime's sessions one "
                "at a time with its default threading, in 3 rounds")
    return "the models of one runtime in alternation, denormals flushed to zero"


def markdown(doc: dict) -> str:
    """report.md from the report's data (report.json's content)."""
    rows = _rows(doc)
    base = rows[0]
    folder = doc.get("run_folder")
    where = (f" Paths name files relative to the run folder (`{folder}`), and the commands run from the "
             f"project folder." if folder else "")
    lines = [f"# Compression report: {doc['name']}", "", *headline(doc),
             f"Recipe `{doc['recipe']}`, {doc['date']}, {doc['machine']}. Every figure is measured on "
             f"the validation split ({doc['data']}) at {doc['img_size']}×{doc['img_size']}; ratios are to "
             f"`{base.stage}`. Latency: CPU, batch 1, median of {doc['runs']} runs, {_timing(doc)}. "
             f"Pipeline wall time "
             f"{doc['seconds'] / 60:.1f} min.{where}", "",
             "| stage | mAP@0.5 | mAP@0.5:0.95 | parameters M | GFLOPs | checkpoint MB | "
             "deployed weights MB | "
             "PyTorch ms | onnxruntime ms | stage time s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_stage = {r.stage: r for r in rows}
    for r in rows:
        cells = [f"{r.stage} ({r.run})"]
        for key, spec, scale in COLUMNS:
            v, b = getattr(r, key), getattr(base, key)
            note = f" at {r.bits} bits" if key == "deployed_mb" else ""
            if r.bits != 32 and key == "torch_ms":
                note = " (simulated)"
            src = by_stage.get(r.float_source)
            if key == "ort_ms" and src is not None and v is not None and src.ort_ms:
                note = f"; {v / src.ort_ms:.2f}× {src.stage}"
            cells.append(f"{_fmt(v and v / scale, spec)}{_ratio(v, b)}{note}")
        cells.append(f"{r.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "- checkpoint MB: the model as cfg + tensors, without training state (a quantized one "
                  "keeps "
                  "float weights and its scales); deployed weights MB: parameters × weight bits / 8.",
              "- PyTorch ms of an INT8 stage is its fake-quant graph (float kernels that simulate the "
              "integer ones), not a deployment figure; onnxruntime ms of an INT8 stage is the INT8 ONNX "
              "as deployed, also as a ratio to the float stage it came from.",
              "- onnxruntime times the float ONNX, or the INT8 Q/DQ ONNX of a quantized checkpoint: "]
    lines += [f"  - {r.stage}: {r.ort_file}{LAYOUT_NOTES.get(r.int8_target, '')}" for r in rows]
    if doc.get("records"):
        lines += ["", "## Stages", ""]
        for rec in doc["records"]:
            what = "given (`--weights`)" if rec["given"] else f"`{rec['command']}`"
            skipped = ", skipped: done earlier" if rec["skipped"] else ""
            lines.append(f"- **{rec['name']}** ({rec['seconds']:.0f} s{skipped}): {what}")
    if doc.get("exports"):
        sizes = doc.get("export_mb", {})
        lines += ["", "## Exports", "", "| file | MB |", "| --- | ---: |"]
        lines += [f"| {p} | {_fmt(sizes.get(p), '.2f')} |" for p in doc["exports"]]
    if doc.get("layers"):
        lines += layer_markdown(doc["layers"])
    if doc.get("figures"):
        lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in doc["figures"]]
    return "\n".join(lines) + "\n"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _megabytes(p: Path) -> float:
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def write(records: list[StageRecord], recipe: Recipe, root: Path, seconds: float, runs: int = 30) -> Path:
    """Measure every stage and write ``report/report.{md,json}`` and the plots; returns the .md path."""
    from utils.datasets import resolve_data

    def show(p: str | Path) -> str:
        return shown_path(p, root, REPO)

    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(records, recipe, out, runs, show=show)
    figures = plots(rows, records, out)
    layer_figures, layers = layer_profile(records, recipe.img_size, out, runs)
    exports = [p for rec in records for p in rec.outputs]
    doc = {"name": root.name, "run_folder": shown_path(root, REPO), "recipe": show(recipe.path),
           "data": show(recipe.data) if recipe.data else "the built-in shapes benchmark",
           "data_file": show(resolve_data(recipe.data)),
           "img_size": recipe.img_size, "runs": runs, "ort_spinning": True, "seconds": round(seconds, 1),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "machine": f"{cpu_description()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                      f"onnxruntime {_ort_version()}",
           "stages": [{**asdict(r), "deployed_mb": r.deployed_mb} for r in rows],
           "ratios": {r.stage: {k: _ratio_value(getattr(r, k), getattr(rows[0], k)) for k, _, _ in COLUMNS}
                      for r in rows},
           "records": [{"name": rec.name, "run": rec.run, "command": _shown_command(rec.command),
                        "seconds": rec.seconds, "skipped": rec.skipped, "given": rec.given}
                       for rec in records],
           "exports": [show(p) for p in exports],
           "exported": [{"export": rec.name, "stage": rec.source} for rec in records
                        if rec.run == "export" and rec.source],
           "export_mb": {show(p): round(_megabytes(p), 3) for p in exports},
           "layers": layers,
           "figures": figures + layer_figures}
    atomic_write(out / "report.json", json.dumps(doc, indent=2) + "\n")
    md = out / "report.md"
    atomic_write(md, markdown(doc))
    return md


def render(report_json: str | Path, out_dir: str | Path | None = None) -> Path:
    """Rebuild ``report.md`` and the two accuracy plots from a ``report.json`` alone (no stage is run or
    measured), into ``out_dir`` (default: the json's folder), with a copy of the json there; the other
    figures it names are left as they are. Returns the .md path."""
    report_json = Path(report_json)
    if report_json.is_dir():  # a run folder, or its report folder
        report_json = next((p for p in (report_json / "report" / "report.json", report_json / "report.json")
                            if p.is_file()), report_json / "report" / "report.json")
    if not report_json.is_file():
        raise UserError(f"{report_json}: no report.json there")
    try:
        doc = json.loads(report_json.read_text())
        rows = _rows(doc)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{report_json}: not a compress.py report ({e})") from None
    if not rows:
        raise UserError(f"{report_json}: the report has no stages")
    out = Path(out_dir) if out_dir else report_json.parent
    out.mkdir(parents=True, exist_ok=True)
    made = accuracy_plots(rows, out)
    doc["figures"] = [*made, *(f for f in doc.get("figures", []) if f not in made)]
    atomic_write(out / "report.json", json.dumps(doc, indent=2) + "\n")
    md = out / "report.md"
    atomic_write(md, markdown(doc))
    return md


def main(argv: list[str] | None = None) -> Path:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=render.__doc__)
    p.add_argument("report", help="a compress run folder, its report/ folder, or a report.json")
    p.add_argument("out_dir", nargs="?", help="where to write (default: beside the report.json)")
    a = p.parse_args(argv)
    md = render(a.report, a.out_dir)
    print(f"wrote {md} and the accuracy plots beside it")
    return md


if __name__ == "__main__":
    from utils.cli import run_cli

    sys.exit(run_cli(main))
