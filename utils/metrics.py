"""Detection metrics that agree with pycocotools: matching, AP, P/R/F1, confusion matrix, COCO JSON.

Matching follows pycocotools' ``evaluateImg`` for area range "all": per image and class, detections in
descending score order (stable) each take the still-unmatched ground truth of highest IoU at or above
the threshold (a later ground truth wins a tie), independently at each of the ten IoU thresholds; at
most ``max_det`` detections per image and class count. AP is COCO's 101-point interpolation of the
monotone precision envelope; the mean runs over classes that have ground truth.
Detections are (n, 6) ``[x1, y1, x2, y2, conf, cls]``; labels are (m, 5) ``[cls, x1, y1, x2, y2]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETS = 100


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (n, 4) x (m, 4) -> (n, m), areas as w * h like pycocotools."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(dets: np.ndarray, labels: np.ndarray, iouv: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """(n, T) bool: which detections of one image are true positives at each IoU threshold.

    ``dets`` must already be in the order to match them (descending confidence within each class).
    """
    tp = np.zeros((len(dets), len(iouv)), bool)
    if len(dets) == 0 or len(labels) == 0:
        return tp
    for c in np.unique(dets[:, 5]):
        di = np.nonzero(dets[:, 5] == c)[0]
        gi = np.nonzero(labels[:, 0] == c)[0]
        if len(gi) == 0:
            continue
        ious = box_iou_np(dets[di, :4], labels[gi, 1:5])
        for t, thr in enumerate(iouv):
            taken = np.zeros(len(gi), bool)
            limit = min(thr, 1 - 1e-10)
            for k in range(len(di)):
                cand = np.where(taken, -1.0, ious[k])
                best = cand.max()
                if best < limit:
                    continue
                g = len(cand) - 1 - int(np.argmax(cand[::-1]))  # the last of equal IoUs, as pycocotools
                taken[g] = True
                tp[di[k], t] = True
    return tp


def _cap_per_class(dets: np.ndarray, max_det: int) -> np.ndarray:
    """Sort by descending confidence (stable) and keep at most ``max_det`` per class."""
    dets = dets[np.argsort(-dets[:, 4], kind="mergesort")]
    keep = np.zeros(len(dets), bool)
    for c in np.unique(dets[:, 5]):
        keep[np.nonzero(dets[:, 5] == c)[0][:max_det]] = True
    return dets[keep]


@dataclass
class ClassStats:
    """Per-class results for the classes that have ground truth (``classes``), plus their means."""

    classes: np.ndarray  # (k,) class indices
    class_labels: np.ndarray  # (k,) ground-truth boxes per class
    ap: np.ndarray  # (k, T)
    p: np.ndarray  # (k,) precision at the confidence of the best mean F1
    r: np.ndarray
    f1: np.ndarray
    conf: float  # that confidence
    recall_points: np.ndarray  # (101,)
    precision_curve: np.ndarray  # (k, 101) interpolated precision at IoU 0.5
    names: list[str]

    @property
    def n_labels(self) -> int:
        return int(self.class_labels.sum())

    @property
    def map50(self) -> float:
        return float(self.ap[:, 0].mean()) if len(self.ap) else 0.0

    @property
    def map(self) -> float:
        return float(self.ap.mean()) if len(self.ap) else 0.0

    @property
    def mp(self) -> float:
        return float(self.p.mean()) if len(self.p) else 0.0

    @property
    def mr(self) -> float:
        return float(self.r.mean()) if len(self.r) else 0.0

    @property
    def mf1(self) -> float:
        return float(self.f1.mean()) if len(self.f1) else 0.0


def ap_per_class(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
                 names: list[str] | None = None) -> ClassStats:
    """AP at every threshold, and P/R/F1 at the confidence that maximises the mean F1 over classes."""
    classes, counts = np.unique(target_cls.astype(int), return_counts=True)
    order = np.argsort(-conf, kind="mergesort")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    n_t = tp.shape[1] if tp.ndim == 2 else len(IOU_THRESHOLDS)
    ap = np.zeros((len(classes), n_t))
    curve = np.zeros((len(classes), len(RECALL_POINTS)))
    grid = np.linspace(0, 1, 1000)  # confidence grid for P/R/F1
    p_conf = np.zeros((len(classes), len(grid)))
    r_conf = np.zeros((len(classes), len(grid)))
    for k, (c, n_gt) in enumerate(zip(classes, counts)):
        sel = pred_cls == c
        if not sel.any():
            continue
        tpc = np.cumsum(tp[sel], 0)
        fpc = np.cumsum(~tp[sel], 0)
        recall = tpc / n_gt
        precision = tpc / (tpc + fpc + np.spacing(1))
        for t in range(n_t):
            q = _interpolated_precision(recall[:, t], precision[:, t])
            ap[k, t] = q.mean()
            if t == 0:
                curve[k] = q
        # recall and precision as functions of the confidence threshold (conf decreasing)
        r_conf[k] = np.interp(-grid, -conf[sel], recall[:, 0], left=0)
        # above its highest confidence a class has no detections: precision 0 there, as pycocotools has it
        p_conf[k] = np.interp(-grid, -conf[sel], precision[:, 0], left=0)
    f1_conf = 2 * p_conf * r_conf / (p_conf + r_conf + 1e-16)
    best = int(f1_conf.mean(0).argmax()) if len(classes) else 0
    return ClassStats(classes, counts, ap, p_conf[:, best], r_conf[:, best], f1_conf[:, best],
                      float(grid[best]), RECALL_POINTS, curve,
                      names or [str(i) for i in range(int(classes.max(initial=-1)) + 1)])


def _interpolated_precision(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """COCO: the precision envelope sampled at 101 recall points (0 beyond the last recall)."""
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.zeros(len(RECALL_POINTS))
    ok = idx < len(envelope)
    q[ok] = envelope[idx[ok]]
    return q


class DetectionStats:
    """Accumulates matches image by image; ``compute`` gives the :class:`ClassStats`.

    Feed images in increasing COCO image id to match pycocotools, which breaks score ties across
    images in that order.
    """

    def __init__(self, iouv: np.ndarray = IOU_THRESHOLDS, max_det: int = COCO_MAX_DETS):
        self.iouv, self.max_det = iouv, max_det
        self._tp, self._conf, self._cls, self._target = [], [], [], []

    def update(self, dets: np.ndarray, labels: np.ndarray) -> None:
        dets = _cap_per_class(np.asarray(dets, np.float64).reshape(-1, 6), self.max_det)
        labels = np.asarray(labels, np.float64).reshape(-1, 5)
        self._tp.append(match_detections(dets, labels, self.iouv))
        self._conf.append(dets[:, 4])
        self._cls.append(dets[:, 5])
        self._target.append(labels[:, 0])

    def compute(self, names: list[str] | None = None) -> ClassStats:
        cat = np.concatenate
        tp = cat(self._tp, 0) if self._tp else np.zeros((0, len(self.iouv)), bool)
        return ap_per_class(tp, cat(self._conf or [np.zeros(0)]), cat(self._cls or [np.zeros(0)]),
                            cat(self._target or [np.zeros(0)]), names)


class ConfusionMatrix:
    """(nc + 1) x (nc + 1) counts: rows predicted class, columns true class; the last is background."""

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), np.int64)

    def update(self, dets: np.ndarray, labels: np.ndarray) -> None:
        dets = np.asarray(dets).reshape(-1, 6)
        dets = dets[dets[:, 4] > self.conf]
        labels = np.asarray(labels).reshape(-1, 5)
        gt_cls, det_cls = labels[:, 0].astype(int), dets[:, 5].astype(int)
        matched_d, matched_g = set(), set()
        if len(dets) and len(labels):
            ious = box_iou_np(labels[:, 1:5], dets[:, :4])
            pairs = np.argwhere(ious > self.iou_thres)
            pairs = pairs[np.argsort(-ious[pairs[:, 0], pairs[:, 1]], kind="mergesort")]
            for g, d in pairs:  # greedy by IoU, one detection per label
                if g in matched_g or d in matched_d:
                    continue
                matched_g.add(g)
                matched_d.add(d)
                self.matrix[det_cls[d], gt_cls[g]] += 1
        for g in set(range(len(labels))) - matched_g:
            self.matrix[self.nc, gt_cls[g]] += 1  # missed
        for d in set(range(len(dets))) - matched_d:
            self.matrix[det_cls[d], self.nc] += 1  # background detected


def coco_ground_truth(images: list[dict], labels: list[np.ndarray], names: list[str]) -> dict:
    """A COCO instances dict: ``images`` (id, file_name, width, height), labels [cls, x1, y1, x2, y2] px."""
    annotations = []
    for img, lab in zip(images, labels):
        for row in np.asarray(lab).reshape(-1, 5):
            x1, y1, x2, y2 = (float(v) for v in row[1:5])
            annotations.append({"id": len(annotations) + 1, "image_id": img["id"], "category_id": int(row[0]),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in enumerate(names)]}


def coco_detections(image_id: int, dets: np.ndarray) -> list[dict]:
    """COCO result rows (bbox x, y, w, h) for one image's (n, 6) detections."""
    return [{"image_id": image_id, "category_id": int(d[5]),
             "bbox": [float(d[0]), float(d[1]), float(d[2] - d[0]), float(d[3] - d[1])], "score": float(d[4])}
            for d in np.asarray(dets).reshape(-1, 6)]


def pycocotools_eval(gt: dict, dets: list[dict]) -> dict[str, float]:
    """pycocotools' bbox mAP@0.5:0.95 (``map``) and mAP@0.5 (``map50``); mAP@0.5:0.95 by object size
    (``map_small`` under 32² px of box area in the original image, ``map_medium`` to 96², ``map_large``
    above; -1 where the split has no such object); and both mAPs with classes ignored (``map_any_class``,
    ``map50_any_class``: a box counts whatever class it names), which separates finding objects from
    naming them. No detections score 0 everywhere (pycocotools cannot load an empty result list)."""
    if not dets:
        return dict.fromkeys(("map", "map50", "map_small", "map_medium", "map_large", "map_any_class",
                              "map50_any_class"), 0.0)
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        stats = []
        for use_cats in (1, 0):
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.useCats = use_cats
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats.append([float(v) for v in ev.stats])
    s, a = stats
    return {"map": s[0], "map50": s[1], "map_small": s[3], "map_medium": s[4], "map_large": s[5],
            "map_any_class": a[0], "map50_any_class": a[1]}
