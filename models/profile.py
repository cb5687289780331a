"""Where a model's CPU time goes, layer by layer, in onnxruntime and in PyTorch.

:func:`layer_times` exports the model to ONNX (float, as deployed), runs it ``runs`` times in an
onnxruntime session with profiling on and sums each run's kernel times by the darknet layer a node
belongs to (node names carry the layer index, ``/model/layers.<i>/...``; layout reorders and the
box decoding count as ``other``; the session does not spin, as profiling sums kernel times, not the
wake-ups between them); and times each layer of the deployed PyTorch model (fused, channels-last)
with forward hooks. Each layer's figure is the median over the runs. :func:`plot_layer_times` draws
two models side by side (before and after pruning), with each layer's share of the GFLOPs beside its
share of the time, so the layers that cost more time than compute stand out.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.darknet import Darknet
from models.summary import as_deployed, summarize

OTHER = -1  # the layer index of nodes that belong to no darknet layer
_LAYER = re.compile(r"layers\.(\d+)[/.]")


@dataclass
class LayerTimes:
    """Median milliseconds per darknet layer (``OTHER``: the rest) in each runtime, and each layer's
    GFLOPs, at ``img_size``."""
    img_size: int
    ort_ms: dict[int, float]
    torch_ms: dict[int, float]
    gflops: dict[int, float]
    types: dict[int, str]

    def totals(self) -> tuple[float, float]:
        return sum(self.ort_ms.values()), sum(self.torch_ms.values())

    def rows(self) -> list[dict]:
        """One dict per layer that costs time or compute, in layer order."""
        keys = sorted(set(self.ort_ms) | set(self.torch_ms) | {k for k, g in self.gflops.items() if g})
        return [{"layer": k, "type": self.types.get(k, "other"), "gflops": self.gflops.get(k, 0.0),
                 "ort_ms": self.ort_ms.get(k, 0.0), "torch_ms": self.torch_ms.get(k, 0.0)} for k in keys]


def _median_by_layer(runs: list[dict[int, float]]) -> dict[int, float]:
    keys = set().union(*runs) if runs else set()
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in sorted(keys)}


def ort_layer_ms(path: Path, img_size: int, runs: int, warmup: int = 3) -> dict[int, float]:
    """Median kernel milliseconds per darknet layer of the ONNX at ``path`` (suite session settings)."""
    from models.onnx import ort_session

    sess = ort_session(path, profile_prefix=path.parent / "ort_profile")
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((1, 3, img_size, img_size), dtype=np.float32)
    for _ in range(warmup + runs):
        sess.run(None, {name: x})
    profile = Path(sess.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    per_run: list[dict[int, float]] = []
    current: dict[int, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            per_run.append(current)
            current = defaultdict(float)
        elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            m = _LAYER.search(e["name"])
            current[int(m.group(1)) if m else OTHER] += e["dur"] / 1e3
    # a run's node events precede its model_run event; drop the warm-up runs
    return _median_by_layer(per_run[warmup:])


def torch_layer_ms(model: Darknet, img_size: int, runs: int, warmup: int = 3) -> dict[int, float]:
    """Median milliseconds per layer of the model's batch-1 forward as deployed (forward hooks; the
    box decoding after the last layer counts as ``OTHER``)."""
    fused = as_deployed(model)
    starts: dict[int, float] = {}
    current: dict[int, float] = {}
    handles = []
    for i, layer in enumerate(fused.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, i=i: starts.__setitem__(i, time.perf_counter())))
        handles.append(layer.register_forward_hook(
            lambda m, a, out, i=i: current.__setitem__(i, (time.perf_counter() - starts[i]) * 1e3)))
    x = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    per_run = []
    try:
        with torch.inference_mode():
            for r in range(warmup + runs):
                current.clear()
                t = time.perf_counter()
                fused(x)
                total = (time.perf_counter() - t) * 1e3
                if r >= warmup:
                    run = dict(current)
                    run[OTHER] = max(total - sum(run.values()), 0.0)
                    per_run.append(run)
    finally:
        for h in handles:
            h.remove()
    return _median_by_layer(per_run)


def layer_times(model: Darknet, img_size: int, runs: int = 20, warmup: int = 3) -> LayerTimes:
    """Per-layer CPU time of ``model`` (float, batch 1) in onnxruntime and PyTorch, and its GFLOPs."""
    from models.onnx import export_onnx

    torch.set_flush_denormal(True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx", img_size)
            ort_ms = ort_layer_ms(path, img_size, runs, warmup)
        torch_ms = torch_layer_ms(model, img_size, runs, warmup)
    finally:
        torch.set_flush_denormal(False)
    s = summarize(model, img_size)
    return LayerTimes(img_size, ort_ms, torch_ms, {r.index: 2 * r.macs / 1e9 for r in s.rows},
                      {r.index: r.type for r in s.rows})


def plot_layer_times(named: list[tuple[str, LayerTimes]], path: Path) -> Path:
    """One panel per runtime: each model's milliseconds per layer as bars, and the share of its GFLOPs
    as a line on the same scale (the layer's share of the model's total time if time followed compute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.outputs import save_figure

    layers = sorted({k for _, t in named for k in (*t.ort_ms, *t.torch_ms)})
    xs = np.arange(len(layers))
    width = 0.8 / len(named)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(layers)), 7), sharex=True)
    for ax, (key, runtime) in zip(axes, (("ort_ms", "onnxruntime"), ("torch_ms", "PyTorch"))):
        for j, (label, t) in enumerate(named):
            ms = getattr(t, key)
            total = sum(ms.values())
            flops = sum(t.gflops.values())
            ax.bar(xs + (j - (len(named) - 1) / 2) * width, [ms.get(k, 0.0) for k in layers], width,
                   label=f"{label}: {total:.1f} ms, {flops:.2f} GFLOPs")
            ax.plot(xs, [total * t.gflops.get(k, 0.0) / flops if flops else 0 for k in layers], "k:" if j
                    else "k--", lw=1, label=f"{label}: time if it followed GFLOPs")
        ax.set_ylabel(f"{runtime} ms")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(xs, ["other" if k == OTHER else str(k) for k in layers], rotation=90, fontsize=7)
    axes[-1].set_xlabel(f"layer (batch 1, {named[0][1].img_size} px)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
