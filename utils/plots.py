"""Figures: training curves, PR curves, confusion matrices (matplotlib, Agg) and boxes on images (OpenCV)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np

from utils.metrics import ClassStats, ConfusionMatrix
from utils.outputs import save_figure


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(csv_path: str | Path, path: str | Path) -> Path:
    """Every numeric column of a results.csv (first column ``epoch``) as a grid of small plots, against the
    epoch column as written (ticks on whole epochs only)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    with Path(csv_path).open() as fh:
        rows = list(csv.DictReader(fh))
    cols = [c for c in (rows[0].keys() if rows else []) if c != "epoch"]
    n = max(len(cols), 1)
    ncol = min(n, 4)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    epochs = [int(r["epoch"]) for r in rows]
    for ax, c in zip(axes.flat, cols):
        ax.plot(epochs, [float(r[c]) for r in rows], marker=".")
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_pr_curve(stats: ClassStats, path: str | Path) -> Path:
    """Precision-recall at IoU 0.5 per class (COCO-interpolated) and their mean."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for k, c in enumerate(stats.classes):
        ax.plot(stats.recall_points, stats.precision_curve[k], lw=1,
                label=f"{stats.names[c]} {stats.ap[k, 0]:.3f}")
    if len(stats.classes):
        ax.plot(stats.recall_points, stats.precision_curve.mean(0), lw=3, color="k",
                label=f"all {stats.map50:.3f} mAP@0.5")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_confusion_matrix(cm: ConfusionMatrix, names: list[str], path: str | Path) -> Path:
    """Counts normalised per true class (columns), background last."""
    plt = pyplot()
    m = cm.matrix.astype(float)
    m = m / np.maximum(m.sum(0, keepdims=True), 1)
    labels = [*names, "background"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.55 * len(labels)))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="true", ylabel="predicted")
    if len(labels) <= 30:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if m[i, j] > 0.005:
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def class_colour(c: int) -> tuple[int, int, int]:
    """A fixed, distinct BGR colour per class index."""
    hue = (c * 47) % 180
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 230]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw_detections(img: np.ndarray, dets: np.ndarray, names: list[str] | None = None) -> np.ndarray:
    """Draw (n, 6) ``[x1, y1, x2, y2, conf, cls]`` boxes with labels on a BGR image (in place)."""
    thick = max(1, round(sum(img.shape[:2]) / 600))
    for x1, y1, x2, y2, conf, c in np.asarray(dets).reshape(-1, 6):
        c = int(c)
        colour = class_colour(c)
        p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
        cv2.rectangle(img, p1, p2, colour, thick, cv2.LINE_AA)
        name = names[c] if names and c < len(names) else str(c)
        text = f"{name} {conf:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        top = max(p1[1], th + base)
        cv2.rectangle(img, (p1[0], top - th - base), (p1[0] + tw, top), colour, -1)
        cv2.putText(img, text, (p1[0], top - base), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return img


def plot_gamma_histograms(history: list[tuple[str, object]], path: str | Path, bins: int = 60,
                          log: bool = False) -> Path:
    """One |γ| histogram per (label, |γ| tensor or array) of ``history``, drawn as lines from the first
    colour to the last; only the first and last are labelled. ``log``: a logarithmic count axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = [np.asarray(g, dtype=np.float64) for _, g in history]
    top = max((float(v.max()) for v in values if v.size), default=1.0) or 1.0
    edges = np.linspace(0, top, bins + 1)
    cmap = plt.get_cmap("viridis")
    for k, ((label, _), v) in enumerate(zip(history, values)):
        counts, _ = np.histogram(v, edges)
        ax.plot((edges[:-1] + edges[1:]) / 2, counts, color=cmap(k / max(len(values) - 1, 1)),
                label=label if k in (0, len(values) - 1) else None)
    ax.set_xlabel("|gamma| of the penalized batch norms")
    ax.set_ylabel("channels")
    if log:
        ax.set_yscale("symlog", linthresh=1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
