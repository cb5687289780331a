"""Anchor fitting for a dataset: k-means on label box sizes at the training size, refined by mutation.

    python -m utils.anchors --data my.data --cfg cfg/yolov3-tiny.cfg --img-size 416 --out my-tiny.cfg

Fitness is the usual YOLO one: for a box and an anchor, r = min(w/aw, aw/w, h/ah, ah/h); a box's best
r over the anchors counts when above 1/thr; ``bpr`` is the share of boxes with some anchor above 1/thr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from models.cfg import ModelCfg, read_cfg, save_cfg
from models.io import fit_head_conv
from utils.errors import UserError


def box_sizes(shapes: np.ndarray, labels: list[np.ndarray], img_size: int) -> np.ndarray:
    """Box (w, h) in pixels after resizing each image's long side to ``img_size``."""
    out = []
    for (w, h), lab in zip(shapes, labels):
        if len(lab):
            s = img_size / max(w, h)
            out.append(lab[:, 3:5] * (w * s, h * s))
    return np.concatenate(out, 0) if out else np.zeros((0, 2))


def anchor_fitness(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> dict[str, float]:
    r = wh[:, None] / anchors[None]
    metric = np.minimum(r, 1 / r).min(2)  # (boxes, anchors)
    best = metric.max(1)
    return {"fitness": float((best * (best > 1 / thr)).mean()), "bpr": float((best > 1 / thr).mean()),
            "anchors_above_thr": float((metric > 1 / thr).sum(1).mean())}


def fit_anchors(wh: np.ndarray, n: int, thr: float = 4.0, generations: int = 300, seed: int = 0
                ) -> tuple[np.ndarray, dict[str, float]]:
    """``n`` anchors (sorted by area) for box sizes ``wh`` (pixels), and their fitness metrics."""
    wh = np.asarray(wh, np.float64)
    wh = wh[(wh >= 2).all(1)]
    if len(wh) < n:
        raise UserError(f"only {len(wh)} boxes of at least 2 px: too few to fit {n} anchors")
    rng = np.random.default_rng(seed)
    # k-means++ on sizes scaled by their spread, then Lloyd iterations
    std = wh.std(0) + 1e-9
    x = wh / std
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, n):
        d = np.min(((x[:, None] - np.array(centres)[None]) ** 2).sum(2), 1)
        centres.append(x[rng.choice(len(x), p=d / d.sum())])
    c = np.array(centres)
    for _ in range(30):
        assign = ((x[:, None] - c[None]) ** 2).sum(2).argmin(1)
        c = np.array([x[assign == k].mean(0) if (assign == k).any() else c[k] for k in range(n)])
    anchors = c * std
    best = anchor_fitness(wh, anchors, thr)["fitness"]
    for _ in range(generations):  # mutate, keep improvements
        trial = anchors * np.clip(rng.normal(1, 0.1, anchors.shape) ** (rng.random(anchors.shape) < 0.9), 0.3,
                                  3.0)
        f = anchor_fitness(wh, trial, thr)["fitness"]
        if f > best:
            anchors, best = trial, f
    anchors = anchors[np.argsort(anchors.prod(1))]
    return anchors, anchor_fitness(wh, anchors, thr)


def write_anchors(cfg: ModelCfg, anchors: np.ndarray, img_size: int | None = None) -> ModelCfg:
    """A copy of ``cfg`` with ``anchors`` in every [yolo] block; when the count changes, masks give the
    largest anchors to the head with the largest stride (strides from feature-map shapes)."""
    from models.darknet import Darknet

    out = cfg.copy()
    anchors = np.round(np.asarray(anchors)).astype(int).clip(1)
    flat = [int(v) for v in anchors.reshape(-1)]
    heads = out.heads
    same_count = all(len(out.layers[i]["anchors"]) // 2 == len(anchors) for i in heads)
    if not same_count:
        strides = Darknet(cfg).strides(img_size)
        order = np.argsort(strides)  # finest head first gets the smallest anchors
        groups = np.array_split(np.arange(len(anchors)), len(heads))
        masks = {heads[h]: groups[k].tolist() for k, h in enumerate(order)}
    for i in heads:
        block = out.layers[i]
        block.set("anchors", flat)
        block.set("num", len(anchors))
        if not same_count:
            block.set("mask", masks[i])
            fit_head_conv(out, i, "anchor count")
    return out


def main(argv: list[str] | None = None) -> Path | None:
    from utils.datasets import split_labels

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--cfg", required=True)
    p.add_argument("--img-size", type=int, default=None, help="default: the cfg's width")
    p.add_argument("--n", type=int, default=None, help="number of anchors (default: the cfg's)")
    p.add_argument("--thr", type=float, default=4.0)
    p.add_argument("--out", default=None, help="write the cfg with the fitted anchors here")
    a = p.parse_args(argv)
    cfg = read_cfg(a.cfg)
    if not cfg.heads:
        raise UserError(f"{a.cfg}: no [yolo] layers")
    img_size = a.img_size or int(cfg.net["width"])
    current = np.array(cfg.layers[cfg.heads[0]]["anchors"], float).reshape(-1, 2)
    shapes, labels = split_labels(a.data, "train")
    wh = box_sizes(shapes, labels, img_size)
    fitted, metrics = fit_anchors(wh, a.n or len(current), a.thr)
    before = anchor_fitness(wh[(wh >= 2).all(1)], current, a.thr)
    print(f"{len(wh)} boxes at {img_size} px")
    print(f"cfg anchors:    fitness {before['fitness']:.4f}  bpr {before['bpr']:.4f}")
    print(f"fitted anchors: fitness {metrics['fitness']:.4f}  bpr {metrics['bpr']:.4f}  "
          f"{', '.join(f'{w:.0f},{h:.0f}' for w, h in fitted)}")
    if a.out:
        out = Path(a.out)
        save_cfg(write_anchors(cfg, fitted, img_size), out)
        print(f"wrote {out}")
        return out
    return None


if __name__ == "__main__":
    from utils.cli import run_cli

    sys.exit(run_cli(main))
