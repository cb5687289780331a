"""The distillation terms. Every function returns a per-batch mean; the hook weights and scales them.

Notation: ``z`` logits (the heads' raw outputs, or ``logit(p)`` with ``new_coords``), ``s``/``t``
student/teacher, ``T`` the temperature, ``σ`` the logistic.

- :func:`class_kl` — ``T²/C · Σ_cells w·KL(softmax(z_t/T) ‖ softmax(z_s/T)) / Σ_cells w`` over the
  C classes of every anchor cell, with ``w = σ(z_t,obj)``: a cell's class distribution counts as much
  as the teacher believes an object is there (Hinton et al., 2015 for the tempered KL). The ``1/C``
  makes it a per-class mean like the detection loss's class BCE.
- :func:`objectness_kl` — the Bernoulli ``KL(σ(z_t) ‖ σ(z_s))`` at every anchor cell (the soft
  objectness target; zero where the two agree).
- :func:`bounded_box_l2` — Chen et al., 2017's teacher-bounded regression: at the ground-truth
  positions, ``‖r_s − r_gt‖²`` counts only where ``‖r_s − r_gt‖² + m > ‖r_t − r_gt‖²``.
- :func:`box_imitation_l2` — ``‖r_s − r_t‖²`` at the ground-truth positions.
- :func:`attention_kl` — attention maps ``A = mean_c |F_c|`` (Zagoruyko & Komodakis, 2017, with
  p = 1), normalised by their spatial mean, turned into spatial distributions ``softmax(A/T)``
  and compared with ``T² · KL(t ‖ s)`` per image; with a mask, all of it over the masked cells only.
- :func:`object_mask` — Wang et al., 2019's "imitate near objects": every cell that a ground-truth
  box overlaps, at a given grid size.
- :func:`class_bernoulli_kl` — ``Σ_cells w·mean_c KL(σ(z_t,c) ‖ σ(z_s,c)) / Σ_cells w`` with
  ``w = σ(z_t,obj)``: the class scores as the independent sigmoids the detection loss trains them as
  (a softmax over them, as in :func:`class_kl`, compares only their differences).
- :func:`adapted_l2` — Wang et al., 2019's fine-grained imitation: ``‖a(F_s) − F_t‖²``, the
  student's feature map through a learned 1×1 adaptation conv ``a`` against the teacher's, averaged
  over the cells of the object mask (normalised by its area) and the channels, and divided by the
  teacher's mean per-channel variance over the whole map, so that it does not depend on the
  teacher's feature scale (about 1 for a prediction of each channel's mean, 0 for a perfect one).

Boxes ``r`` are in the regression space of the student's head: the cell offsets ``x, y`` and
``log(w / anchor), log(h / anchor)`` (the teacher's decoded boxes are expressed over the student's
anchors, so teachers with other anchor sizes compare too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.layers import YoloHead
from utils.loss import head_logits


def class_kl(head: YoloHead, ps: torch.Tensor, pt: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher-objectness-weighted class KL over all anchor cells of one head (raw maps)."""
    if head.classes < 2:  # a softmax over one class is constant
        return ps.new_zeros(())
    zs = head_logits(head, ps[..., 5:]).flatten(0, -2) / temperature
    zt = head_logits(head, pt[..., 5:]).flatten(0, -2) / temperature
    w = head_logits(head, pt[..., 4]).flatten().sigmoid()
    log_t = F.log_softmax(zt, -1)
    kl = (log_t.exp() * (log_t - F.log_softmax(zs, -1))).sum(-1)
    # per class, as the detection loss's BCE is a mean over the class columns, so that a weight of 1
    # means the same strength for both (summed over 6 classes, this term was 6x the detection cls)
    return (w * kl).sum() / w.sum().clamp(min=1e-9) * temperature ** 2 / head.classes


def bernoulli_kl(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(σ(z_t) ‖ σ(z_s))`` from logits: BCE(z_s, q) − H(q), the cross-entropy less the
    teacher's own entropy, zero at z_s = z_t."""
    q = zt.sigmoid()
    return (F.binary_cross_entropy_with_logits(zs, q, reduction="none")
            - F.binary_cross_entropy_with_logits(zt, q, reduction="none"))


def objectness_kl(head: YoloHead, ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """Mean Bernoulli KL between the teacher's and the student's objectness over all anchor cells."""
    return bernoulli_kl(head_logits(head, ps[..., 4]), head_logits(head, pt[..., 4])).mean()


def to_regression(box: torch.Tensor, anchors_grid: torch.Tensor) -> torch.Tensor:
    """Boxes (n, 4) as :func:`decode_box` gives them (or ground truth in the same units) → cell
    offsets and log size over ``anchors_grid``, the space where box terms are compared."""
    return torch.cat((box[:, :2], torch.log(box[:, 2:] / anchors_grid).clamp(min=-math.log(1e3))), 1)


def bounded_box_l2(rs: torch.Tensor, rt: torch.Tensor, rgt: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over positives of the student's L2 error where it is not within ``margin`` of the teacher's."""
    es, et = (rs - rgt).pow(2).sum(1), (rt - rgt).pow(2).sum(1)
    # a student within float noise of the teacher (1e-4 in squared cell units) is not worse than it
    return (es * (es + margin > et + 1e-4)).mean() if len(es) else rs.sum() * 0


def box_imitation_l2(rs: torch.Tensor, rt: torch.Tensor) -> torch.Tensor:
    return (rs - rt).pow(2).sum(1).mean() if len(rs) else rs.sum() * 0


def attention_map(f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W): mean |F| over channels, divided by its mean over the ``keep`` cells."""
    a = f.float().abs().mean(1).flatten(1)
    mean = (a * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
    return a / mean.clamp(min=1e-9)


def attention_kl(fs: torch.Tensor, ft: torch.Tensor, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images of ``T²·KL`` between the teacher's and student's spatial attention.

    ``mask`` (B, H, W) bool restricts everything, normalisation included, to the masked cells, so
    nothing outside them matters; images without a masked cell do not count (zero when none has one).
    """
    if fs.shape[-2:] != ft.shape[-2:]:
        raise ValueError(f"feature maps {tuple(fs.shape)} and {tuple(ft.shape)} differ in size")
    b, _, h, w = fs.shape
    keep = torch.ones(b, h * w, dtype=torch.bool, device=fs.device) if mask is None else mask.flatten(1)
    zs, zt = attention_map(fs, keep) / temperature, attention_map(ft, keep) / temperature
    very_low = -1e4  # a cell outside the mask: probability 0 without infinities in the arithmetic
    log_s = F.log_softmax(zs.masked_fill(~keep, very_low), 1)
    log_t = F.log_softmax(zt.masked_fill(~keep, very_low), 1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~keep, 0).sum(1)
    used = keep.any(1)
    if not used.any():
        return zs.sum() * 0
    return kl[used].mean() * temperature ** 2


def object_mask(targets: torch.Tensor, batch: int, ny: int, nx: int) -> torch.Tensor:
    """(B, ny, nx) bool: the cells that any ground-truth box of the image overlaps with positive area.

    ``targets`` (N, 6) [image, class, cx, cy, w, h] normalised; cell ``j`` spans ``[j, j+1)`` grid
    units, so a box from ``x1`` to ``x2`` covers the columns ``floor(x1) .. ceil(x2) − 1``.
    """
    t = targets.float()
    cols = torch.arange(nx, device=t.device, dtype=t.dtype)
    rows = torch.arange(ny, device=t.device, dtype=t.dtype)
    x1, x2 = (t[:, 2] - t[:, 4] / 2) * nx, (t[:, 2] + t[:, 4] / 2) * nx
    y1, y2 = (t[:, 3] - t[:, 5] / 2) * ny, (t[:, 3] + t[:, 5] / 2) * ny
    in_x = (cols[None] + 1 > x1[:, None]) & (cols[None] < x2[:, None])  # (N, nx)
    in_y = (rows[None] + 1 > y1[:, None]) & (rows[None] < y2[:, None])  # (N, ny)
    per_box = (in_y[:, :, None] & in_x[:, None, :]).float()  # (N, ny, nx)
    out = torch.zeros(batch, ny, nx, device=t.device)
    out.index_add_(0, t[:, 0].long(), per_box)
    return out > 0


def class_bernoulli_kl(head: YoloHead, ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """Teacher-objectness-weighted Bernoulli KL of every class score over all anchor cells (raw maps)."""
    kl = bernoulli_kl(head_logits(head, ps[..., 5:]), head_logits(head, pt[..., 5:])).mean(-1)
    w = head_logits(head, pt[..., 4]).sigmoid()
    return (w * kl).sum() / w.sum().clamp(min=1e-9)


def adapted_l2(fa: torch.Tensor, ft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the adapted student features ``fa`` against the teacher's ``ft`` (both
    (B, C, H, W)) over the cells of ``mask`` (B, H, W) bool, in units of the teacher's feature
    variance. Zero when no cell is masked."""
    if fa.shape != ft.shape:
        raise ValueError(f"adapted feature map {tuple(fa.shape)} and teacher's {tuple(ft.shape)} differ")
    keep = mask[:, None].to(fa.dtype)
    n = keep.sum()
    if n == 0:
        return fa.sum() * 0
    ft = ft.float()
    err = ((fa.float() - ft).pow(2) * keep).sum() / (n * ft.shape[1])
    # the scale: the teacher's per-channel variance over the whole map, which a few masked cells of
    # near-equal features (a small object on a coarse grid) cannot make vanish
    return err / ft.var((0, 2, 3)).mean().clamp(min=1e-12)
