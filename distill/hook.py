"""Knowledge distillation for detectors as a trainer hook: ``train.py --t_weights T.pt --KDstr N``.

The teacher runs in eval mode under ``no_grad`` on the same (augmented, rescaled) batch as the
student; it is not part of the student module, so it gets no gradients, no optimizer state and no
EMA. Each strategy adds some of these terms (:mod:`distill.losses` has the formulas):

=========  =========================================================================================
strategy   terms
=========  =========================================================================================
1          ``kd_cls`` (class KL, all cells) + ``kd_obj`` (objectness KL, all cells)
2          ``kd_box`` teacher-bounded box L2 at the ground-truth positions + ``kd_cls`` + ``kd_obj``
3          ``kd_box`` imitation of the teacher's boxes at the ground-truth positions + ``kd_cls``
4          strategy 3 + ``kd_feat`` attention-map KL of the stride-matched feature maps
5          strategy 3 + ``kd_feat`` restricted to the cells of the ground-truth boxes
6          strategy 2's ``kd_box`` + ``kd_cls`` as per-class Bernoulli KL + ``kd_obj`` + ``kd_feat`` as
           fine-grained imitation: the student's feature map through a learned 1×1 adaptation conv
           (least-squares fitted on the first batch, then trained) against the teacher's, in the
           ground-truth cells, normalised by the mask's area and the teacher's variance, its weight
           ramped up over ``--kd-warmup`` epochs
=========  =========================================================================================

Strategy 6 is this suite's own (Wang et al., 2019's imitation with sigmoid-consistent soft targets);
1 to 5 keep the older tools' meaning. Its adaptation convs belong to the hook, not to the student:
the optimizer trains them with the student, a resumed run gets them back from ``last.pt``'s training
state, and the saved and exported student is the same network as without distillation.

Scaling: ``kd_box``, ``kd_obj`` and ``kd_cls`` are multiplied by the detection loss's own gains
(``box``, ``obj`` with the per-stride balance, ``cls``), so a weight of 1 makes a term as strong as
its detection counterpart would be at the same value; ``kd_feat`` has only its weight. Like the
detection loss, the sum is multiplied by the batch size. Each term is logged per epoch as
``train/kd_*`` in results.csv and TensorBoard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.losses import (
    adapted_l2,
    attention_kl,
    bounded_box_l2,
    box_imitation_l2,
    class_bernoulli_kl,
    class_kl,
    object_mask,
    objectness_kl,
    to_regression,
)
from distill.matching import FeatureTap, match_features, match_heads
from engine.distributed import world_size
from engine.hooks import TrainContext, TrainHook
from models.darknet import Darknet
from models.io import load_model
from models.shapes import infer_shapes
from utils.cli import NONNEGATIVE, POSITIVE, option, refuse_unused
from utils.errors import UserError
from utils.loss import LossOutput, decode_box, obj_balance

STRATEGIES = {1: ("cls", "obj"), 2: ("box_bounded", "cls", "obj"), 3: ("box", "cls"),
              4: ("box", "cls", "feat"), 5: ("box", "cls", "feat_masked"),
              6: ("box_bounded", "cls_bernoulli", "obj", "feat_adapted")}


@dataclass
class DistillOptions:
    """``train.py``'s distillation flags; :meth:`hook` is the hook they ask for (None: off)."""
    kd_str: int = option(0, "--KDstr", "--kd-str", type=int, choices=(0, *STRATEGIES), metavar="1..6",
                         help="strategy: 1 outputs, 2 + teacher-bounded boxes, 3 box imitation + classes, "
                              "4 3 + attention maps, 5 4 near the objects only, 6 2 + adapted features "
                              "near the objects")
    t_weights: str = option("", "--t_weights", "--t-weights",
                            help="teacher: a .pt alone, or darknet weights with --t_cfg")
    t_cfg: str = option("", "--t_cfg", "--t-cfg", help="teacher cfg (darknet weights)")
    kd_t: float = option(3.0, "--kd-t", type=POSITIVE, help="temperature of the class softmax")
    kd_feat_t: float = option(1.0, "--kd-feat-t", type=POSITIVE,
                              help="temperature of the spatial attention softmax (4, 5)")
    kd_cls: float = option(1.0, "--kd-cls", type=NONNEGATIVE, help="class KL weight (x the cls gain)")
    kd_obj: float = option(1.0, "--kd-obj", type=NONNEGATIVE, help="objectness KL weight (x the obj gain)")
    kd_box: float = option(1.0, "--kd-box", type=NONNEGATIVE, help="box term weight (x the box gain)")
    kd_feat: float = option(1.0, "--kd-feat", type=NONNEGATIVE,
                            help="attention KL weight (4, 5); adapted feature weight (6, x the box gain)")
    kd_warmup: float = option(1.0, "--kd-warmup", type=NONNEGATIVE,
                              help="strategy 6: epochs over which the feature weight ramps up from 0")
    # strategy 2: the student's box error counts unless within this of the teacher's
    kd_margin: float = option(0.0, "--kd-margin", type=NONNEGATIVE, help="strategy 2: teacher-bound margin")

    def check(self) -> None:
        refuse_unused(self, bool(self.kd_str or self.t_weights), "--t_weights and --KDstr 1..6",
                      exempt=("kd_str", "t_weights"))
        if self.t_weights and not self.kd_str:  # the older tools' plain --t_cfg --t_weights
            print("--t_weights without --KDstr: strategy 1 (Hinton's distillation of the outputs)")
            self.kd_str = 1

    def hook(self) -> DistillHook | None:
        if not self.kd_str and not self.t_weights:
            return None
        self.check()
        return DistillHook(self)


def load_teacher(t_weights: str, t_cfg: str = "", device: torch.device | str = "cpu") -> Darknet:
    if not t_weights:
        raise UserError("--KDstr needs a teacher: --t_weights (a .pt, or darknet weights with --t_cfg)")
    if not t_weights.endswith(".pt") and not t_cfg:
        raise UserError(f"--t_weights {t_weights}: darknet weights need the teacher's --t_cfg")
    teacher = load_model(t_weights, t_cfg or None, device=device, cfg_flag="--t_cfg")
    # inference only: batch norms folded into the convs, no gradients
    return teacher.eval().requires_grad_(False).fuse()


def _record(store: dict[int, torch.Tensor], key: int, training_only: bool):
    """A forward hook that keeps a layer's output. A plain closure, not a method: the EMA deep-copies
    the student with its hooks, and a copied bound method would copy this hook (and the teacher)."""
    def hook(module: nn.Module, args, output: torch.Tensor) -> None:
        if module.training or not training_only:
            store[key] = output
    return hook


class DistillHook(TrainHook):
    def __init__(self, opts: DistillOptions):
        if opts.kd_str not in STRATEGIES:
            raise UserError(f"--KDstr {opts.kd_str}: expected one of {', '.join(map(str, STRATEGIES))}")
        for name in ("kd_t", "kd_feat_t"):
            if getattr(opts, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')}: must be > 0")
        self.opts = opts
        self.terms = STRATEGIES[opts.kd_str]
        self.teacher: Darknet | None = None
        self._s_feats: dict[int, torch.Tensor] = {}
        self._t_feats: dict[int, torch.Tensor] = {}
        # strategy 6: one 1×1 conv per feature pair, student channels → teacher channels
        self.adapters = nn.ModuleList()
        self._adapters_fitted = False  # fitted by least squares on the first batch (or loaded on resume)
        self._progress = (0, 0)  # (epoch, batches seen in it): the feature weight's warm-up

    def inputs(self) -> list[str]:
        return [self.opts.t_weights, self.opts.t_cfg]

    def prepare_model(self, ctx: TrainContext, model: nn.Module) -> nn.Module:
        o = self.opts
        self.teacher = load_teacher(o.t_weights, o.t_cfg, ctx.device)
        self.teacher.to(memory_format=torch.channels_last)
        for size in set(ctx.sizes):
            if size % self.teacher.max_stride:
                raise UserError(f"--img-size {size}: must be a multiple of the teacher's largest stride "
                                f"{self.teacher.max_stride} ({o.t_weights})")
        self.head_pairs = match_heads(model, self.teacher, o.t_weights)
        self.feat_pairs = []
        if any(t.startswith("feat") for t in self.terms) and o.kd_feat > 0:
            self.feat_pairs = match_features(model, self.teacher)
            if not self.feat_pairs:
                raise UserError(f"--t_weights {o.t_weights}: no feature map of the student has the stride "
                                f"of one of the teacher's; strategies 4 and 5 need one")
            for s, t in self.feat_pairs:
                model.layers[s.layer].register_forward_hook(_record(self._s_feats, s.layer, True))
                self.teacher.layers[t.layer].register_forward_hook(_record(self._t_feats, t.layer, False))
            if "feat_adapted" in self.terms:
                self.adapters = make_adapters(model, self.teacher, self.feat_pairs).to(ctx.device)
        strides = ", ".join(f"{s.stride:g} (layers {s.layer}/{t.layer})" for s, t in self.feat_pairs)
        print(f"distillation: strategy {o.kd_str} ({' + '.join(self.terms)}) from {o.t_weights}"
              + (f"; features at stride {strides}" if strides else ""))
        return model

    def parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def state_dict(self) -> dict:
        return {"adapters": self.adapters.state_dict()} if len(self.adapters) else {}

    def load_state_dict(self, state: dict) -> None:
        if len(self.adapters):
            if "adapters" not in state:
                raise UserError("the run being resumed saved no adaptation convs for --KDstr 6")
            self.adapters.load_state_dict(state["adapters"])
            self._adapters_fitted = True

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        self._progress = (epoch, 0)

    def feature_ramp(self, ctx: TrainContext) -> float:
        """Strategy 6's feature weight factor: linear from 0 to 1 over ``--kd-warmup`` epochs."""
        epoch, batch = self._progress
        if self.opts.kd_warmup <= 0:
            return 1.0
        return min(1.0, (epoch + batch / max(ctx.batches, 1)) / self.opts.kd_warmup)

    def after_backward(self, ctx: TrainContext) -> None:
        _average_gradients_over_ranks(self.adapters)

    def extra_losses(self, ctx: TrainContext, imgs: torch.Tensor, targets: torch.Tensor,
                     preds: list[torch.Tensor], loss: LossOutput) -> dict[str, torch.Tensor]:
        o, teacher, gains = self.opts, self.teacher, ctx.gains
        ramp = self.feature_ramp(ctx)
        self._progress = (self._progress[0], self._progress[1] + 1)
        with torch.no_grad(), torch.autocast(imgs.device.type, enabled=ctx.amp):
            t_raw = teacher(imgs)[1]
        out: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            out[name] = out.get(name, 0) + value

        for head, ps, k, pos in zip(ctx.model.yolo_heads, preds, self.head_pairs, loss.positives):
            t_head, pt, ps = teacher.yolo_heads[k], t_raw[k].float(), ps.float()
            stride = imgs.shape[2] / ps.shape[2]
            if "cls" in self.terms:
                add("kd_cls", class_kl(head, ps, pt, o.kd_t) * gains.cls * o.kd_cls)
            if "cls_bernoulli" in self.terms:
                add("kd_cls", class_bernoulli_kl(head, ps, pt) * gains.cls * o.kd_cls)
            if "obj" in self.terms:
                add("kd_obj", objectness_kl(head, ps, pt) * obj_balance(stride) * gains.obj * o.kd_obj)
            if "box" in self.terms or "box_bounded" in self.terms:
                idx = (pos.b, pos.a, pos.gj, pos.gi)
                a_s = head.anchors.to(ps.device)[pos.a] / stride
                a_t = t_head.anchors.to(ps.device)[pos.a] / stride
                rs = to_regression(decode_box(head, ps[idx], a_s), a_s)
                rt = to_regression(decode_box(t_head, pt[idx], a_t), a_s)
                if "box" in self.terms:
                    term = box_imitation_l2(rs, rt)
                else:
                    term = bounded_box_l2(rs, rt, to_regression(pos.tbox, a_s), o.kd_margin)
                add("kd_box", term * gains.box * o.kd_box)
        if self.feat_pairs:
            masked = "feat_masked" in self.terms or "feat_adapted" in self.terms
            targets = targets.to(imgs.device)
            feats = [(self._s_feats.pop(s.layer), self._t_feats.pop(t.layer)) for s, t in self.feat_pairs]
            if "feat_adapted" in self.terms and not self._adapters_fitted:
                for conv, (fs, ft) in zip(self.adapters, feats):
                    fit_least_squares(conv, fs, ft)
                _broadcast_from_rank0(self.adapters)
                self._adapters_fitted = True
            for k, (fs, ft) in enumerate(feats):
                mask = object_mask(targets, fs.shape[0], *fs.shape[2:]) if masked else None
                if "feat_adapted" in self.terms:
                    with torch.autocast(imgs.device.type, enabled=ctx.amp):
                        fa = self.adapters[k](fs)
                    term = adapted_l2(fa, ft, mask) * gains.box * o.kd_feat * ramp
                else:
                    term = attention_kl(fs, ft, o.kd_feat_t, mask) * o.kd_feat
                add("kd_feat", term)
        bs = imgs.shape[0]
        return {k: v * bs for k, v in out.items()}


def make_adapters(student: Darknet, teacher: Darknet,
                  pairs: list[tuple[FeatureTap, FeatureTap]]) -> nn.ModuleList:
    """One 1×1 conv per feature pair, from the student's channels to the teacher's (fitted to the
    first batch by :func:`fit_least_squares` before it is used)."""
    s_shapes, t_shapes = infer_shapes(student.cfg), infer_shapes(teacher.cfg)
    adapters = nn.ModuleList(nn.Conv2d(s_shapes[s.layer].c, t_shapes[t.layer].c, 1) for s, t in pairs)
    return adapters.to(memory_format=torch.channels_last)


@torch.no_grad()
def fit_least_squares(conv: nn.Conv2d, fs: torch.Tensor, ft: torch.Tensor, ridge: float = 1e-6) -> None:
    """Set a 1×1 conv to the (ridge-)least-squares linear map from the student's feature map ``fs`` to
    the teacher's ``ft`` over every cell of a batch. From a random start the imitation term was still
    1.7-2.1 teacher variances late in a 3-epoch fine-tuning run, against 1.1-1.2 after this fit (Adam
    at 5e-4 moves a weight at most about 0.2 in 375 steps), and pushed the student with noise."""
    x = fs.detach().double().permute(0, 2, 3, 1).reshape(-1, fs.shape[1])
    y = ft.detach().double().permute(0, 2, 3, 1).reshape(-1, ft.shape[1])
    x = torch.cat((x, torch.ones_like(x[:, :1])), 1)  # the bias
    gram = x.T @ x
    gram += torch.eye(len(gram), dtype=gram.dtype, device=gram.device) * ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram, x.T @ y)  # (Cs + 1, Ct)
    conv.weight.copy_(w[:-1].T[:, :, None, None].to(conv.weight.dtype))
    conv.bias.copy_(w[-1].to(conv.bias.dtype))


def _broadcast_from_rank0(module: nn.Module) -> None:
    """DDP ranks start from rank 0's fit (the convs are not inside the DDP-wrapped student)."""
    if world_size() > 1:
        import torch.distributed as dist

        for p in module.parameters():
            dist.broadcast(p.data, 0)


def _average_gradients_over_ranks(module: nn.Module) -> None:
    """What DDP does for the student's parameters, for the adaptation convs outside it: each rank's
    loss is scaled by the world size to keep DDP's average a sum, so the all-reduced sum is divided
    by it once."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size())
