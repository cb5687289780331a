"""Anchor fitting for a dataset: k-means on label box sizes at the training size, refined by mutation.

    python -m utils.anchors --data my.data --cfg cfg/yolov3-tiny.cfg --img-size 416 --out my-tiny.cfg

Fitness is the usual YOLO one: for a box and an anchor, r = min(w/aw, aw/w, h/ah, ah/h); a box's best
r over the anchors counts when above 1/thr; ``bpr`` is the share of boxes with some anchor above 1/thr.
Boxes under 2 px on either side are left out of the fit and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from models.cfg import ModelCfg, read_cfg, save_cfg
from models.io import fit_head_conv
from models.shapes import infer_shapes
from utils.errors import UserError
from utils.outputs import OutputPlan

MIN_BOX = 2.0  # pixels; smaller boxes say nothing about anchor shapes
FIT_SAMPLE = 30_000  # boxes the search uses at most (a random subset); metrics use all


def box_sizes(shapes: np.ndarray, labels: list[np.ndarray], img_size: int) -> np.ndarray:
    """Box (w, h) in pixels after resizing each image's long side to ``img_size``.

    ``shapes`` (n, 2) are image (width, height); ``labels`` one (k, 5) array [cls, cx, cy, w, h] per image.
    """
    if len(shapes) != len(labels):
        raise ValueError(f"{len(shapes)} image shapes but {len(labels)} label arrays")
    out = [np.zeros((0, 2))]
    for (w, h), lab in zip(shapes, labels):
        if len(lab):
            s = img_size / max(w, h)
            out.append(np.asarray(lab, np.float64)[:, 3:5] * (w * s, h * s))
    return np.concatenate(out, 0)


def usable_boxes(wh: np.ndarray) -> tuple[np.ndarray, int]:
    """The boxes of at least ``MIN_BOX`` pixels on both sides, and how many were dropped."""
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    keep = (wh >= MIN_BOX).all(1)
    return wh[keep], int((~keep).sum())


def anchor_fitness(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> dict[str, float]:
    """``fitness`` (mean best ratio metric, counted above 1/thr), ``bpr`` (share of boxes with an anchor
    above 1/thr) and ``anchors_above_thr`` (mean number of such anchors per box)."""
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    anchors = np.asarray(anchors, np.float64).reshape(-1, 2)
    if not len(wh):
        raise UserError("no boxes to measure anchors against")
    if not len(anchors) or (anchors <= 0).any():
        raise UserError(f"anchors must be positive (w, h) pairs, got {anchors.tolist()}")
    r = wh[:, None] / anchors[None]
    metric = np.minimum(r, 1 / r).min(2)  # (boxes, anchors)
    best = metric.max(1)
    return {"fitness": float((best * (best > 1 / thr)).mean()), "bpr": float((best > 1 / thr).mean()),
            "anchors_above_thr": float((metric > 1 / thr).sum(1).mean())}


def _kmeans(x: np.ndarray, n: int, rng: np.random.Generator, iters: int = 100) -> np.ndarray:
    """Plain k-means with a k-means++ start; returns the ``n`` centres."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, n):
        d = ((x[:, None] - np.array(centres)[None]) ** 2).sum(2).min(1)
        pick = rng.choice(len(x), p=d / d.sum()) if d.sum() > 0 else rng.integers(len(x))
        centres.append(x[pick])
    c = np.array(centres)
    for _ in range(iters):
        assign = ((x[:, None] - c[None]) ** 2).sum(2).argmin(1)
        counts = np.bincount(assign, minlength=n)[:, None]
        sums = np.stack([np.bincount(assign, x[:, j], minlength=n) for j in range(x.shape[1])], 1)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)  # an empty cluster keeps its centre
        if np.allclose(new, c):
            break
        c = new
    return c


def fit_anchors(wh: np.ndarray, n: int, thr: float = 4.0, generations: int = 300, seed: int = 0
                ) -> tuple[np.ndarray, dict[str, float]]:
    """``n`` anchors (sorted by area) for box sizes ``wh`` (pixels), and their metrics on all boxes.

    k-means on log sizes (distance there is the size ratio the fitness measures), then ``generations``
    rounds of random multiplicative mutation that keep any improvement in fitness; both stages use at
    most ``FIT_SAMPLE`` boxes. ``metrics['dropped_small']`` counts the boxes under ``MIN_BOX`` pixels.
    """
    if n < 1:
        raise UserError(f"the number of anchors must be at least 1, got {n}")
    wh, dropped = usable_boxes(wh)
    if len(wh) < n:
        raise UserError(f"only {len(wh)} boxes of at least {MIN_BOX:g} px ({dropped} smaller ones dropped): "
                        f"too few to fit {n} anchors")
    rng = np.random.default_rng(seed)
    sample = wh[rng.choice(len(wh), FIT_SAMPLE, replace=False)] if len(wh) > FIT_SAMPLE else wh
    anchors = np.exp(_kmeans(np.log(sample), n, rng))
    best = anchor_fitness(sample, anchors, thr)["fitness"]
    for _ in range(generations):
        mutate = rng.random(anchors.shape) < 0.9
        trial = anchors * np.where(mutate, np.clip(rng.normal(1, 0.1, anchors.shape), 0.3, 3.0), 1.0)
        trial = trial.clip(MIN_BOX)
        f = anchor_fitness(sample, trial, thr)["fitness"]
        if f > best:
            anchors, best = trial, f
    anchors = anchors[np.argsort(anchors.prod(1))]
    return anchors, {**anchor_fitness(wh, anchors, thr), "dropped_small": dropped}


def head_strides(cfg: ModelCfg, img_size: int | None = None) -> list[float]:
    """Each head's stride from its feature-map height at ``img_size`` (the cfg's height by default)."""
    size = img_size or cfg.net["height"]
    shapes = infer_shapes(cfg, size, size)
    return [size / shapes[i].h for i in cfg.heads]


def write_anchors(cfg: ModelCfg, anchors: np.ndarray, img_size: int | None = None) -> ModelCfg:
    """A copy of ``cfg`` with ``anchors`` (rounded, sorted by area) in every [yolo] block.

    When every head already has that many anchors its mask is kept; otherwise the anchors are split
    evenly over the heads, the largest to the head with the largest stride, and the convs feeding the
    heads are resized to match.
    """
    anchors = np.asarray(anchors, np.float64)
    if anchors.ndim != 2 or anchors.shape[1] != 2 or not len(anchors) or (anchors <= 0).any():
        raise UserError(f"anchors must be positive (w, h) pairs, got {anchors.tolist()}")
    anchors = np.round(anchors).clip(1).astype(int)
    anchors = anchors[np.argsort(anchors.prod(1), kind="stable")]
    out = cfg.copy()
    heads = out.heads
    if not heads:
        raise UserError(f"{cfg.source}: no [yolo] layers to write anchors into")
    same_count = all(out.layers[i]["num"] == len(anchors) for i in heads)
    if not same_count:
        if len(anchors) < len(heads):
            raise UserError(f"{cfg.source}: {len(anchors)} anchors cannot be shared by {len(heads)} heads")
        order = np.argsort(head_strides(cfg, img_size), kind="stable")  # finest head first
        groups = np.array_split(np.arange(len(anchors)), len(heads))
        masks = {heads[h]: groups[k].tolist() for k, h in enumerate(order)}
    for i in heads:
        block = out.layers[i]
        block.set("anchors", [int(v) for v in anchors.reshape(-1)])
        block.set("num", len(anchors))
        if not same_count:
            block.set("mask", masks[i])
            fit_head_conv(out, i, "anchor count")
    return out


def _print_metrics(label: str, m: dict[str, float], anchors: np.ndarray) -> None:
    print(f"{label:<15} fitness {m['fitness']:.4f}  bpr {m['bpr']:.4f}  anchors/box above thr "
          f"{m['anchors_above_thr']:.2f}  [{'  '.join(f'{w:.0f},{h:.0f}' for w, h in anchors)}]")


def build_parser() -> argparse.ArgumentParser:
    from utils.cli import COUNT, COUNT0, IMG_SIZE, RATIO_ABOVE_1, SEED, Parser

    p = Parser(prog="python -m utils.anchors",
               description=__doc__)
    p.add_argument("--data", required=True, help="darknet .data file; its train split is used")
    p.add_argument("--cfg", required=True, help="cfg whose anchors are compared and replaced")
    p.add_argument("--img-size", type=IMG_SIZE, default=None, help="training size (default: the cfg's width)")
    p.add_argument("--n", type=COUNT, default=None, help="number of anchors (default: the cfg's)")
    p.add_argument("--thr", type=RATIO_ABOVE_1, default=4.0, help="anchor/box size ratio threshold")
    p.add_argument("--generations", type=COUNT0, default=300, help="mutation rounds after k-means")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", default=None, help="write the cfg with the fitted anchors here")
    p.add_argument("--exist-ok", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> Path | None:
    from utils.datasets import split_labels

    a = build_parser().parse_args(argv)
    if a.out:  # checked before the work: never over the input cfg, an existing file only with --exist-ok
        plan = OutputPlan([a.cfg, a.data], a.exist_ok)
        plan.add(a.out)
        plan.check()
    cfg = read_cfg(a.cfg)
    if not cfg.heads:
        raise UserError(f"{a.cfg}: no [yolo] layers")
    img_size = a.img_size or int(cfg.net["width"])
    current = np.array(cfg.layers[cfg.heads[0]]["anchors"], float).reshape(-1, 2)
    shapes, labels = split_labels(a.data, "train")
    wh, dropped = usable_boxes(box_sizes(shapes, labels, img_size))
    n = a.n or len(current)
    if len(wh) < n:
        raise UserError(f"{a.data}: the train split has {len(wh)} boxes of at least {MIN_BOX:g} px at "
                        f"{img_size} px, too few to fit {n} anchors")
    fitted, _ = fit_anchors(wh, n, a.thr, a.generations, a.seed)
    print(f"{len(wh)} boxes at {img_size} px ({dropped} under {MIN_BOX:g} px left out), thr {a.thr:g}")
    _print_metrics("cfg anchors:", anchor_fitness(wh, current, a.thr), current)
    rounded = np.round(fitted).clip(1)  # what the cfg gets
    _print_metrics("fitted anchors:", anchor_fitness(wh, rounded, a.thr), rounded)
    if a.out is None:
        return None
    out = Path(a.out)
    save_cfg(write_anchors(cfg, fitted, img_size), out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from utils.cli import run_cli

    sys.exit(run_cli(main))
