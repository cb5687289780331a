"""YOLOv3/v4 detection loss: darknet-style anchor assignment, CIoU/GIoU box loss, objectness and class BCE.

Assignment follows darknet: a target belongs to the anchor (over all heads) whose shape matches it best,
and also to every other anchor whose shape IoU exceeds ``iou_t``; it is placed in the grid cell that
holds its centre on that anchor's head. Box predictions are decoded as the head decodes them,
``scale_x_y`` and ``new_coords`` included, so training optimises what inference outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.layers import YoloHead

DEFAULT_LOSS_HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "iou_t": 0.2, "cls_pw": 1.0, "obj_pw": 1.0,
                    "label_smoothing": 0.0, "box_loss": "ciou"}
OBJ_BALANCE = {8: 4.0, 16: 1.0, 32: 0.4}  # objectness weight per stride; finer grids have more cells


def obj_balance(stride: float) -> float:
    """The objectness weight of a head at ``stride`` (strides outside 8/16/32 by their side of them)."""
    return OBJ_BALANCE.get(round(stride), 4.0 if stride < 8 else 0.1)


@dataclass
class HeadTargets:
    """The positive positions of one head: batch, anchor, grid row/col, and what they should predict."""

    b: torch.Tensor
    a: torch.Tensor
    gj: torch.Tensor
    gi: torch.Tensor
    tbox: torch.Tensor  # (n, 4) cx, cy relative to the cell, w, h in grid units
    tcls: torch.Tensor  # (n,) class index
    target_index: torch.Tensor  # (n,) row of the targets tensor


@dataclass
class LossOutput:
    total: torch.Tensor  # scalar to backpropagate (mean losses times batch size, as ultralytics scales it)
    components: torch.Tensor  # (3,) box, obj, cls, detached
    positives: list[HeadTargets]


def _shape_iou(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of boxes and anchors aligned at one corner: (n, 2) x (m, 2) -> (n, m)."""
    inter = torch.min(wh[:, None], anchors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat((b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2), 1)


class YoloLoss:
    """Loss for a model's ``[yolo]`` heads; call with the raw head maps, targets and the input size."""

    def __init__(self, heads: list[YoloHead], hyp: dict | None = None, img_size: int = 416):
        self.heads = heads
        self.hyp = {**DEFAULT_LOSS_HYP, **(hyp or {})}
        nl, nc = len(heads), heads[0].classes
        # ultralytics' scaling, so one set of gains fits any head count, class count and image size
        self.gain_box = self.hyp["box"] * 3 / nl
        self.gain_cls = self.hyp["cls"] * nc / 80 * 3 / nl
        self.gain_obj = self.hyp["obj"] * (img_size / 640) ** 2 * 3 / nl
        if self.hyp["box_loss"] not in ("ciou", "giou"):
            raise ValueError(f"hyp box_loss must be 'ciou' or 'giou', got {self.hyp['box_loss']!r}")

    def assign(self, preds: list[torch.Tensor], targets: torch.Tensor, img_hw: tuple[int, int]
               ) -> list[HeadTargets]:
        """Positives per head for ``targets`` (N, 6) [image, class, cx, cy, w, h] normalized."""
        device = targets.device
        h_img, w_img = img_hw
        wh_px = targets[:, 4:6] * torch.tensor([w_img, h_img], device=device)
        all_anchors = torch.cat([h.anchors.to(device) for h in self.heads])
        ious = _shape_iou(wh_px, all_anchors) if len(targets) else torch.zeros(0, len(all_anchors),
                                                                                  device=device)
        chosen = ious > self.hyp["iou_t"]
        if len(targets):
            chosen[torch.arange(len(targets), device=device), ious.argmax(1)] = True
        out, start = [], 0
        for p in preds:
            _, na, ny, nx, _ = p.shape
            t_idx, a = chosen[:, start:start + na].nonzero(as_tuple=True)
            start += na
            t = targets[t_idx]
            gxy = t[:, 2:4] * torch.tensor([nx, ny], device=device, dtype=t.dtype)
            gwh = t[:, 4:6] * torch.tensor([nx, ny], device=device, dtype=t.dtype)
            gi = gxy[:, 0].long().clamp(0, nx - 1)
            gj = gxy[:, 1].long().clamp(0, ny - 1)
            tbox = torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1)
            out.append(HeadTargets(t[:, 0].long(), a, gj, gi, tbox, t[:, 1].long(), t_idx))
        return out

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor, img_hw: tuple[int, int]
                 ) -> LossOutput:
        from torchvision.ops import complete_box_iou_loss, generalized_box_iou_loss

        box_loss = complete_box_iou_loss if self.hyp["box_loss"] == "ciou" else generalized_box_iou_loss
        preds = [p.float() for p in preds]
        device = preds[0].device
        targets = targets.to(device)
        positives = self.assign(preds, targets, img_hw)
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(self.hyp["obj_pw"], device=device))
        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(self.hyp["cls_pw"], device=device))
        eps = self.hyp["label_smoothing"]
        cp, cn = 1.0 - 0.5 * eps, 0.5 * eps
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for head, p, pos in zip(self.heads, preds, positives):
            tobj = torch.zeros(p.shape[:4], device=device)
            stride = img_hw[0] / p.shape[2]
            if len(pos.b):
                ps = p[pos.b, pos.a, pos.gj, pos.gi]
                pbox = decode_box(head, ps, head.anchors.to(device)[pos.a] / stride)
                loss = box_loss(_cxcywh_to_xyxy(pbox), _cxcywh_to_xyxy(pos.tbox), reduction="none")
                lbox = lbox + loss.mean()
                tobj[pos.b, pos.a, pos.gj, pos.gi] = (1.0 - loss.detach()).clamp(0)
                if head.classes > 1:
                    tc = torch.full_like(ps[:, 5:], cn)
                    tc[torch.arange(len(pos.b), device=device), pos.tcls] = cp
                    lcls = lcls + bce_cls(head_logits(head, ps[:, 5:]), tc)
            lobj = lobj + bce_obj(head_logits(head, p[..., 4]), tobj) * obj_balance(stride)
        lbox, lobj, lcls = lbox * self.gain_box, lobj * self.gain_obj, lcls * self.gain_cls
        bs = preds[0].shape[0]
        return LossOutput((lbox + lobj + lcls) * bs, torch.stack((lbox, lobj, lcls)).detach(), positives)


def decode_box(head: YoloHead, ps: torch.Tensor, anchors_grid: torch.Tensor) -> torch.Tensor:
    """Raw predictions (n, 5 + C) at their cells → boxes (n, 4): cx, cy relative to the cell, w, h in
    grid units (``anchors_grid`` is each row's anchor in grid units), as the head decodes them."""
    s = head.scale_x_y
    if head.new_coords:  # the conv already applied the logistic
        xy, wh = ps[:, :2], 4 * ps[:, 2:4] ** 2
    else:
        xy, wh = ps[:, :2].sigmoid(), ps[:, 2:4].clamp(max=math.log(1e3)).exp()
    return torch.cat((xy * s - 0.5 * (s - 1), wh * anchors_grid), 1)


def head_logits(head: YoloHead, x: torch.Tensor) -> torch.Tensor:
    """Objectness or class outputs as logits (with new_coords the head outputs probabilities)."""
    return torch.logit(x.clamp(1e-6, 1 - 1e-6)) if head.new_coords else x
