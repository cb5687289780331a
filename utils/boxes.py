"""Box formats, IoU and non-maximum suppression.

Formats: ``xywh`` is (cx, cy, w, h); ``xyxy`` is (x1, y1, x2, y2). Functions take the last dimension
as the box and work on torch tensors; ``*_np`` twins exist only where NumPy callers need them.
"""

from __future__ import annotations

import numpy as np
import torch


def xywh2xyxy(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    y = x.clone() if isinstance(x, torch.Tensor) else np.copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    y = x.clone() if isinstance(x, torch.Tensor) else np.copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(0) * (a[:, 3] - a[:, 1]).clamp(0)
    area_b = (b[:, 2] - b[:, 0]).clamp(0) * (b[:, 3] - b[:, 1]).clamp(0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.001, iou_thres: float = 0.6,
                        classes: list[int] | None = None, agnostic: bool = False,
                        max_det: int = 300, multi_label: bool = True) -> list[torch.Tensor]:
    """Per-image NMS on decoded model output.

    ``pred`` is (B, N, 5 + C): cx, cy, w, h, objectness, per-class scores (as ``Darknet`` eval mode
    returns). The confidence of a box for a class is objectness x class score. With ``multi_label``
    a box may be kept once per class above ``conf_thres`` (what mAP evaluation wants); otherwise only
    its best class. Returns one (n, 6) tensor per image: x1, y1, x2, y2, confidence, class.
    """
    from torchvision.ops import batched_nms  # lazy: importing torchvision costs seconds

    out = []
    for x in pred:
        x = x[x[:, 4] > conf_thres]
        if not len(x):
            out.append(pred.new_zeros((0, 6)))
            continue
        scores = x[:, 5:] * x[:, 4:5]
        boxes = xywh2xyxy(x[:, :4])
        if multi_label and scores.shape[1] > 1:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j, None], j[:, None].to(x.dtype)), 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat((boxes, conf, j.to(x.dtype)), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            det = det[(det[:, 5:6] == torch.tensor(classes, device=det.device)).any(1)]
        if not len(det):
            out.append(det)
            continue
        groups = torch.zeros_like(det[:, 5]) if agnostic else det[:, 5]
        keep = batched_nms(det[:, :4].float(), det[:, 4].float(), groups, iou_thres)[:max_det]
        out.append(det[keep])
    return out


def scale_boxes(boxes: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int],
                ratio_pad: tuple | None = None) -> torch.Tensor:
    """Map xyxy boxes in a letterboxed image of size ``from_hw`` back to the original ``to_hw``.

    ``ratio_pad`` is ``((rw, rh), (padw, padh))`` as ``letterbox`` returns it; without it the
    letterbox is recomputed (centred, aspect kept). Boxes are clipped to the original image in place.
    """
    if ratio_pad is None:
        r = min(from_hw[0] / to_hw[0], from_hw[1] / to_hw[1])
        ratio = (r, r)
        pad = ((from_hw[1] - to_hw[1] * r) / 2, (from_hw[0] - to_hw[0] * r) / 2)
    else:
        ratio, pad = ratio_pad
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad[0]) / ratio[0]
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad[1]) / ratio[1]
    clip_boxes(boxes, to_hw)
    return boxes


def clip_boxes(boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, hw[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, hw[0])
    return boxes
