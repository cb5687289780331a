"""Evaluation over a dataloader: mAP, P/R/F1, per-class table, speed, validation losses, COCO JSON.

``test.py`` is a thin command-line wrapper around :func:`evaluate`; the trainer calls it every epoch.
Boxes are compared in original-image pixels, as pycocotools compares them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.boxes import non_max_suppression, scale_boxes, xywh2xyxy
from utils.cli import BATCH, COUNT, FRACTION, IMG_SIZE, WORKERS, option
from utils.errors import UserError
from utils.metrics import ClassStats, ConfusionMatrix, DetectionStats, coco_detections, coco_ground_truth
from utils.outputs import atomic_write


@dataclass
class EvalResult:
    stats: ClassStats
    losses: list[float]  # box, obj, cls on the validation set (nan without a loss function)
    speed_ms: dict[str, float]  # per image: pre, inference, nms
    n_images: int
    confusion: ConfusionMatrix
    coco: dict[str, float] = field(default_factory=dict)  # pycocotools_eval's numbers when asked

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
def evaluate(detector: Callable[[torch.Tensor], Any], loader, names: list[str], conf_thres: float = 0.001,
             iou_thres: float = 0.6, loss_fn=None, max_det: int = 300, half: bool = False,
             verbose: bool = True, json_path: Path | None = None, device: torch.device | str | None = None
             ) -> EvalResult:
    """Run ``detector`` over ``loader`` (rect batches, with ``shapes``).

    ``detector`` maps a (B, 3, H, W) batch in [0, 1] to detections (B, N, 5 + C), or to (detections,
    raw heads) as a ``Darknet`` in eval mode does (``loss_fn`` needs the raw heads). A module is put in
    eval mode (and back afterwards) and runs on its parameters' device; any other callable (an ONNX
    back-end) is given batches on ``device`` (default: the CPU). With ``json_path`` the detections are
    written there in COCO format, the ground truth beside it (``*_gt.json``), and pycocotools' mAP is
    reported next to ours.
    """
    module = detector if isinstance(detector, nn.Module) else None
    if device is None:
        device = next(module.parameters()).device if module is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    dtype = torch.float16 if half and device.type == "cuda" and module is not None else torch.float32
    if dtype == torch.float16:
        module.half()
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
        out = detector(imgs)
        dets, raw = out if isinstance(out, tuple) else (out, None)
        _sync(device)
        t2 = time.perf_counter()
        if loss_fn is not None and raw is not None:
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
        module.float()
    if module is not None:
        module.train(was_training)
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
    return pycocotools_eval(gt, dets)


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


@dataclass
class TestOptions:
    """The flags of ``test.py``."""
    weights: str = option("", "--weights", required=True,
                          help=".pt checkpoint, darknet weights with --cfg, or an exported .onnx "
                               "(onnxruntime)")
    cfg: str = option("", "--cfg", help="cfg for darknet .weights")
    data: str = option("", "--data", help=".data file (default: built-in shapes benchmark)")
    task: str = option("valid", "--task", choices=("valid", "train"), help="which split")
    batch_size: int = option(16, "--batch-size", type=BATCH)
    img_size: int | None = option(None, "--img-size", type=IMG_SIZE,
                                  help="default: the checkpoint's (an ONNX: its export size), else the cfg's")
    conf_thres: float = option(0.001, "--conf-thres", type=FRACTION)
    iou_thres: float = option(0.6, "--iou-thres", type=FRACTION, help="NMS IoU")
    max_det: int = option(300, "--max-det", type=COUNT, help="detections per image after NMS")
    save_json: bool = option(False, "--save-json",
                             help="write COCO-format detections and ground truth, and score them with "
                                  "pycocotools: also mAP by object size and with classes ignored")
    device: str = option("", "--device")
    half: bool = option(False, "--half", help="float16 inference (CUDA only)")
    workers: int = option(2, "--workers", type=WORKERS)
    name: str = option("exp", "--name")
    project: str = option("runs/test", "--project")


def format_coco(coco: dict[str, float]) -> str:
    """pycocotools' numbers as ``test.py --save-json`` prints them: the mAPs, mAP@0.5:0.95 by object size,
    and the mAPs with classes ignored (how much is lost finding objects, how much naming them)."""
    size = lambda k: "none" if coco[k] < 0 else f"{coco[k]:.4f}"  # noqa: E731 - -1: no such object
    return (f"pycocotools: mAP@0.5 {coco['map50']:.4f} mAP@0.5:0.95 {coco['map']:.4f}\n"
            f"  mAP@0.5:0.95 by box area: small (< 32² px) {size('map_small')}, medium {size('map_medium')}, "
            f"large (> 96² px) {size('map_large')}\n"
            f"  classes ignored: mAP@0.5 {coco['map50_any_class']:.4f} "
            f"mAP@0.5:0.95 {coco['map_any_class']:.4f}")


def evaluate_weights(o: TestOptions) -> EvalResult:
    """``test.py``: evaluate a ``.pt``, darknet weights or an exported ONNX on a split of a ``.data``
    file; prints the table and writes the PR curve and confusion matrix into a new run folder."""
    from models.backends import load_detector
    from utils.datasets import create_dataloader, read_data_file, resolve_data
    from utils.files import new_run_dir
    from utils.plots import plot_confusion_matrix, plot_pr_curve
    from utils.torch_utils import select_device

    device = select_device(o.device)
    weights = Path(o.weights)
    if weights.suffix == ".onnx":
        det = load_detector(weights)
        if det.classes is None:
            raise UserError(f"--weights {weights}: its output width is dynamic, so its class count is "
                            f"unknown")
        detector, classes, stride, rect = det, det.classes, det.stride, det.fixed_hw is None
        size = det.img_size
    else:
        from models.io import open_checkpoint, resolve_img_size

        opened = open_checkpoint(weights, o.cfg or None, device)
        detector, classes, rect = opened.model.eval(), opened.model.cfg.classes, True
        stride, size = opened.model.max_stride, resolve_img_size(o.img_size, opened.img_size, opened.model)
    data = read_data_file(resolve_data(o.data))
    if classes != data.classes:
        raise UserError(f"{weights}: the model predicts {classes} classes, {data.path} has {data.classes}")
    img_size = o.img_size or size
    if img_size % stride:
        raise UserError(f"--img-size {img_size}: must be a multiple of {stride}")
    if not rect and detector.fixed_hw != (img_size, img_size):
        raise UserError(f"--img-size {img_size}: {weights} was exported for {detector.fixed_hw} only; "
                        f"export it with --dynamic to test at other sizes")
    half = o.half and device.type == "cuda"
    if o.half and not half:
        print("warning: --half needs CUDA; evaluating in float32")
    loader, _ = create_dataloader(data.split(o.task), data.classes, img_size, o.batch_size,
                                  stride, rect=rect, workers=o.workers, need_boxes=True)
    out_dir = new_run_dir(o.project, o.name)
    result = evaluate(detector, loader, data.names, o.conf_thres, o.iou_thres, max_det=o.max_det, half=half,
                      json_path=out_dir / "detections.json" if o.save_json else None, device=device)
    print(format_table(result, data.names))
    sp = result.speed_ms
    print(f"speed per image at {img_size}: {sp['pre']:.1f} ms pre, {sp['inference']:.1f} ms inference, "
          f"{sp['nms']:.1f} ms NMS ({device}, batch {o.batch_size})")
    if result.coco:
        print(format_coco(result.coco))
    plot_pr_curve(result.stats, out_dir / "pr_curve.png")
    plot_confusion_matrix(result.confusion, data.names, out_dir / "confusion_matrix.png")
    print(f"results in {out_dir}")
    return result
