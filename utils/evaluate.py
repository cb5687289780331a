"""Evaluation over a dataloader: mAP, P/R/F1, per-class table, speed, validation losses, COCO JSON.

``test.py`` is a thin command-line wrapper around :func:`evaluate`; the trainer calls it every epoch.
Boxes are compared in original-image pixels, as pycocotools compares them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.boxes import non_max_suppression, scale_boxes, xywh2xyxy
from utils.metrics import ClassStats, ConfusionMatrix, DetectionStats, coco_detections, coco_ground_truth
from utils.outputs import atomic_write


@dataclass
class EvalResult:
    stats: ClassStats
    losses: list[float]  # box, obj, cls on the validation set (nan without a loss function)
    speed_ms: dict[str, float]  # per image: pre, inference, nms
    n_images: int
    confusion: ConfusionMatrix
    coco: dict[str, float] = field(default_factory=dict)  # pycocotools' map/map50 when asked

    @property
    def mp(self) -> float:
        return float(self.stats.mp)

    @property
    def mr(self) -> float:
        return float(self.stats.mr)

    @property
    def map50(self) -> float:
        return float(self.stats.map50)

    @property
    def map(self) -> float:
        return float(self.stats.map)


def labels_to_original(targets: torch.Tensor, img_hw: tuple[int, int], shape) -> np.ndarray:
    """(n, 5) [cls, cx, cy, w, h] normalized to the batch image -> [cls, x1, y1, x2, y2] original px."""
    h, w = img_hw
    boxes = xywh2xyxy(targets[:, 1:5].clone()) * torch.tensor([w, h, w, h], dtype=targets.dtype)
    boxes = scale_boxes(boxes, img_hw, shape[0], shape[1])
    return torch.cat((targets[:, :1], boxes), 1).numpy()


@torch.no_grad()
def evaluate(model: nn.Module, loader, names: list[str], conf_thres: float = 0.001, iou_thres: float = 0.6,
             loss_fn=None, max_det: int = 300, half: bool = False, verbose: bool = True,
             json_path: Path | None = None) -> EvalResult:
    """Run ``model`` (eval mode, returns (dets, raw)) over ``loader`` (rect batches, with ``shapes``).

    With ``json_path`` the detections are written there in COCO format, the ground truth beside it
    (``*_gt.json``), and pycocotools' mAP is reported next to ours.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    dtype = torch.float16 if half and device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        model.half()
    stats = DetectionStats()
    confusion = ConfusionMatrix(len(names))
    losses = torch.zeros(3)
    t_pre = t_inf = t_nms = 0.0
    n_images = 0
    coco_images, coco_labels, coco_dets = [], [], []
    t0 = time.perf_counter()
    iterator = loader
    if verbose:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluating", bar_format="{l_bar}{bar:10}{r_bar}")
    for imgs, targets, paths, shapes in iterator:
        imgs = imgs.to(device, non_blocking=True).to(dtype) / 255
        _sync(device)
        t1 = time.perf_counter()
        dets, raw = model(imgs)
        _sync(device)
        t2 = time.perf_counter()
        if loss_fn is not None:
            losses += loss_fn([r.float() for r in raw], targets, tuple(imgs.shape[2:])).components.cpu()
        out = non_max_suppression(dets.float(), conf_thres, iou_thres, max_det=max_det)
        t3 = time.perf_counter()
        t_pre, t_inf, t_nms = t_pre + t1 - t0, t_inf + t2 - t1, t_nms + t3 - t2
        img_hw = tuple(imgs.shape[2:])
        for i, pred in enumerate(out):
            pred = pred.cpu()
            pred[:, :4] = scale_boxes(pred[:, :4], img_hw, shapes[i][0], shapes[i][1])
            labels = labels_to_original(targets[targets[:, 0] == i, 1:], img_hw, shapes[i])
            d = pred.numpy()
            stats.update(d, labels)
            confusion.update(d, labels)
            if json_path is not None:
                image_id = len(coco_images)
                h0, w0 = shapes[i][0]
                coco_images.append({"id": image_id, "file_name": Path(paths[i]).name, "width": w0,
                                    "height": h0})
                coco_labels.append(labels)
                coco_dets += coco_detections(image_id, d)
        n_images += imgs.shape[0]
        t0 = time.perf_counter()
    if dtype == torch.float16:
        model.float()
    model.train(was_training)
    nb = max(len(loader), 1)
    result = EvalResult(stats.compute(names), (losses / nb).tolist(),
                        {k: 1000 * v / max(n_images, 1) for k, v in
                         (("pre", t_pre), ("inference", t_inf), ("nms", t_nms))},
                        n_images, confusion)
    if json_path is not None:
        result.coco = _coco_eval(Path(json_path), coco_images, coco_labels, coco_dets, names)
    return result


def _coco_eval(json_path: Path, images, labels, dets, names) -> dict[str, float]:
    from utils.metrics import pycocotools_eval

    gt = coco_ground_truth(images, labels, names)
    gt_path = json_path.with_name(json_path.stem + "_gt.json")
    atomic_write(gt_path, json.dumps(gt))
    atomic_write(json_path, json.dumps(dets))
    return pycocotools_eval(gt, dets) if dets else {"map": 0.0, "map50": 0.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(result: EvalResult, names: list[str]) -> str:
    """The per-class table test.py prints: images, labels, P, R, F1, mAP@0.5, mAP@0.5:0.95."""
    s = result.stats
    head = f"{'class':>16}{'labels':>10}{'P':>10}{'R':>10}{'F1':>10}{'mAP@.5':>10}{'mAP@.5:.95':>12}"
    lines = [head, f"{'all':>16}{s.n_labels:>10}{s.mp:>10.3f}{s.mr:>10.3f}{s.mf1:>10.3f}"
                   f"{s.map50:>10.4f}{s.map:>12.4f}"]
    for k, c in enumerate(s.classes):
        lines.append(f"{names[c]:>16}{s.class_labels[k]:>10}{s.p[k]:>10.3f}{s.r[k]:>10.3f}{s.f1[k]:>10.3f}"
                     f"{s.ap[k, 0]:>10.4f}{s.ap[k].mean():>12.4f}")
    return "\n".join(lines)
