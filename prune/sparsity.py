"""BN-L1 sparse training (Liu et al., 2017, "network slimming"): a trainer hook.

With ``train.py -sr --s S`` the batch-norm scales γ of the selected convs are pulled towards zero by
``S · Σ|γ|``, in one of two ways (``--sr-mode``):

- ``proximal`` (the default): after each optimizer step, a soft threshold::

      γ ← sign(γ) · max(|γ| − η · s_c, 0)

  with ``η`` = hyp ``lr0`` times the learning-rate schedule at that step (warm-up and cosine): the
  step SGD takes, the same number with Adam (which itself runs at hyp ``adam_lr_ratio`` of it). So
  ``--s`` pulls equally hard with either optimizer, and a channel whose data gradient cannot hold it lands on
  exactly zero instead of oscillating around it;
- ``subgradient`` (the older tools'): ``γ.grad += s_c · sign(γ)`` once per optimizer step, after AMP
  unscaling and before gradient clipping. Adam normalises it like every gradient, so there ``--s``
  barely sets the strength; kept to reproduce old runs.

Either is applied once per optimizer step, so neither gradient accumulation nor the AMP loss scale
changes its strength (a step AMP skips is not thresholded either). ``--prune-method M``
penalizes exactly the batch norms pruning method M ranks (:meth:`prune.methods.PruneMethod.
penalized_convs`), so one sparse run prepares channel and layer pruning together for
``layer_channel``. The older tools' ``--prune 0|1|2`` still works: 0 the convs normal/regular pruning
may cut, 1 also the convs tied by shortcuts (shortcut/slim), 2 the convs of removable residual blocks
(layer pruning).

``--sr-schedule`` sets ``s_c`` in epoch ``e`` of ``E`` (decay point ``D = --sr-decay-at``,
local share ``K = --sr-keep``):

- ``constant``: ``s_c = S``;
- ``global``: ``s_c = S`` while ``e < D·E``, then ``S · 0.01`` for every channel;
- ``local``: ``s_c = S`` while ``e < D·E``; afterwards, at each epoch start, the share ``K`` of
  selected channels with the largest |γ| gets ``S · 0.01`` and the rest keep ``S``, so the important
  channels recover while the others keep shrinking. ``--sr-rank`` says where the share is taken:
  ``global`` over all selected channels (the older tools'), or ``layer``: within each layer, channels
  tied by shortcuts ranked together as the pruning method scores them (one group per tied set), so
  every layer keeps its share instead of a layer whose γ happen to be a little smaller being emptied.
  ``--sr-keep-from CFG`` (with ``--sr-rank layer``) spares each layer as many channels as it has in
  CFG, a cut of the same network (``docs/cuts/``; one a benchmark timed before training), instead of
  one share for all: the sparse stage empties exactly what ``prune/*_prune.py --widths-from CFG``
  will remove.

A γ the threshold zeroes is zeroed in the weights' moving average too (what is evaluated and saved).
Every epoch the hook prints and logs to TensorBoard, for the model the checkpoint keeps (the moving
average with ``--ema``), the share of selected γ that are exactly zero
(``sparsity/share_zero``) and below 0.01 (``sparsity/share_below_0.01``), a histogram (``bn_gamma``),
and redraws ``gamma.png`` in the run folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.hooks import TrainContext, TrainHook
from models.cfg import ModelCfg, read_cfg
from models.graph import ChannelGraph
from prune.methods import METHODS, SPARSITY_ALIASES, PruneMethod, method
from prune.policies import channel_units, group_score, unit_keeps
from utils.cli import FRACTION, SPARSITY, given_flags, option, refuse_unused
from utils.errors import UserError

SCHEDULES = ("constant", "global", "local")
RANKS = ("global", "layer")
MODES = ("proximal", "subgradient")
DECAY = 0.01  # the factor of the decayed penalty
SMALL = 0.01  # |γ| below this counts as pruned in the logged share
DEFAULT_S = {"proximal": 0.1, "subgradient": 0.001}


@dataclass
class SparsityOptions:
    """``train.py``'s sparse-training flags; :meth:`hook` is the hook they ask for (None: off)."""
    sr: bool = option(False, "-sr", "--sr", help="sparse training: pull the penalized BN gammas to zero")
    s: float | None = option(None, "--s", type=SPARSITY,
                      help=f"sparsity rate (default {DEFAULT_S['proximal']} proximal, "
                           f"{DEFAULT_S['subgradient']} subgradient)")
    sr_mode: str = option("proximal", "--sr-mode", choices=MODES,
                          help="proximal: soft-threshold gamma by lr*s after each step (exact zeros, "
                               "the same with Adam and SGD); subgradient: the older tools' s*sign(gamma) "
                               "gradient")
    prune_method: str = option("", "--prune-method", choices=list(METHODS),
                               help="the pruning method to come: the batch norms it ranks are penalized")
    prune: int = option(0, "--prune", type=int, choices=tuple(SPARSITY_ALIASES),
                        help="the older spelling (without --prune-method): 0 normal/regular, 1 also "
                             "shortcut-tied (shortcut/slim), 2 residual-block convs (layer)")
    sr_schedule: str = option("constant", "--sr-schedule", choices=SCHEDULES,
                              help="constant; global: s*0.01 after --sr-decay-at; local: then only the "
                                   "--sr-keep largest-gamma share gets s*0.01")
    sr_decay_at: float = option(0.5, "--sr-decay-at", type=FRACTION,
                                help="fraction of the epochs after which the decay starts")
    sr_keep: float = option(0.15, "--sr-keep", type=FRACTION,
                            help="local decay: share of channels (largest |gamma|) whose rate decays")
    sr_rank: str = option("global", "--sr-rank", choices=RANKS,
                          help="local decay: take the --sr-keep share over all penalized channels (global) "
                               "or within each layer, tied channels together (layer: no layer is emptied)")
    sr_keep_from: str = option("", "--sr-keep-from", metavar="CFG",
                               help="local decay ranked by layer: spare as many channels in each layer as it "
                                    "has in this cfg (a cut of the same network, as prune --widths-from "
                                    "takes), instead of the --sr-keep share")

    @property
    def method(self) -> PruneMethod:
        """The pruning method whose batch norms are penalized: --prune-method, else --prune's."""
        return method(self.prune_method or SPARSITY_ALIASES[self.prune])

    def check(self) -> None:
        refuse_unused(self, self.sr, "-sr (sparse training)", exempt=("sr",))
        if self.sr_rank != "global" and self.sr_schedule != "local":
            raise UserError(f"--sr-rank {self.sr_rank}: only the local schedule ranks channels; add "
                            f"--sr-schedule local (now {self.sr_schedule})")
        if self.sr_keep_from:
            if self.sr_rank != "layer":
                raise UserError(f"--sr-keep-from {self.sr_keep_from}: it gives each layer its own count; add "
                                f"--sr-schedule local --sr-rank layer")
            if given_flags(self, ["sr_keep"]):
                raise UserError(f"--sr-keep {self.sr_keep}: does nothing with --sr-keep-from (the cfg gives "
                                f"every layer's count)")
            m = self.method
            if not m.takes_widths:
                raise UserError(f"--sr-keep-from: {m.name} pruning does not take its widths from a cfg; "
                                f"use a channel method (--prune-method normal, shortcut, slim or regular)")
        if self.sr and self.s is None:  # recorded as used, so a later default cannot change a resumed run
            self.s = DEFAULT_S[self.sr_mode]

    def hook(self) -> SparsityHook | None:
        if not self.sr:
            return None
        s = DEFAULT_S[self.sr_mode] if self.s is None else self.s
        keep_from = read_cfg(self.sr_keep_from) if self.sr_keep_from else None
        return SparsityHook(s, self.method, self.sr_schedule, self.sr_decay_at, self.sr_keep,
                            self.sr_mode, self.sr_rank, keep_from)


def sparse_convs(model: nn.Module, m: PruneMethod | str) -> list[int]:
    """The conv layer indices whose γ sparse training penalizes for pruning method ``m``."""
    return (method(m) if isinstance(m, str) else m).penalized_convs(model.cfg)


Units = list[list[torch.Tensor]]  # per unit, each channel group's indices into the flattened γ


def kept_channels(gammas: torch.Tensor, keep: float, units: Units | None = None,
                  score: str = "max", counts: list[int] | None = None) -> torch.Tensor:
    """True for the channels of the share ``keep`` of groups with the largest score in each unit
    (:func:`prune.policies.group_score`), or of the ``counts[u]`` best groups of unit ``u`` where
    ``counts`` is given; ``units`` None: every channel is a group of one, all in one unit."""
    g = gammas.abs()
    mask = torch.zeros_like(g, dtype=torch.bool)
    if units is None:
        mask[g.topk(math.ceil(keep * g.numel())).indices] = True
        return mask
    for groups, count in zip(units, counts if counts is not None else [None] * len(units), strict=True):
        scores = torch.tensor([group_score(g[idx], score) for idx in groups])
        n = count if count is not None else math.ceil(keep * len(groups))
        for k in scores.topk(n).indices.tolist():
            mask[groups[k]] = True
    return mask


def sparsity_scale(schedule: str, s: float, epoch: int, epochs: int, decay_at: float, keep: float,
                   gammas: torch.Tensor, units: Units | None = None, score: str = "max",
                   counts: list[int] | None = None) -> torch.Tensor:
    """The per-channel penalty ``s_c`` for the flattened γ of all selected convs (see module doc);
    ``units``/``score``/``counts``: where the local schedule's share is taken (:func:`kept_channels`)."""
    if schedule not in SCHEDULES:
        raise UserError(f"--sr-schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    scale = torch.full_like(gammas, s)
    if schedule == "constant" or epoch < decay_at * epochs:
        return scale
    if schedule == "global":
        return scale * DECAY
    scale[kept_channels(gammas, keep, units, score, counts)] = s * DECAY
    return scale


def layer_units(model: nn.Module, convs: list[int]) -> Units:
    """:func:`prune.policies.channel_units` of ``convs`` as indices into their flattened γ."""
    offset, start = {}, 0
    for i in convs:
        offset[i] = start
        start += model.layers[i].bn.num_features
    return [[torch.tensor([offset[i] + c for i, c in chans]) for chans in unit]
            for unit in channel_units(ChannelGraph(model.cfg), convs)]


class SparsityHook(TrainHook):
    """Pulls the γ of the selected batch norms towards zero once per optimizer step: a soft threshold
    after the step (``proximal``) or ``s_c · sign(γ)`` added to the gradient (``subgradient``)."""

    def __init__(self, s: float, prune_method: PruneMethod | str = "normal", schedule: str = "constant",
                 decay_at: float = 0.5, keep: float = 0.15, mode: str = "proximal", rank: str = "global",
                 keep_from: ModelCfg | None = None):
        if s < 0:
            raise UserError(f"--s {s}: the sparsity rate must be >= 0")
        if not 0 <= decay_at <= 1 or not 0 <= keep <= 1:
            raise UserError(f"--sr-decay-at {decay_at} and --sr-keep {keep} must be in [0, 1]")
        if schedule not in SCHEDULES:
            raise UserError(f"--sr-schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if mode not in MODES:
            raise UserError(f"--sr-mode {mode!r}: expected one of {', '.join(MODES)}")
        if rank not in RANKS:
            raise UserError(f"--sr-rank {rank!r}: expected one of {', '.join(RANKS)}")
        if keep_from is not None and (rank != "layer" or schedule != "local"):
            raise UserError(f"--sr-keep-from {keep_from.source}: needs --sr-schedule local --sr-rank layer")
        self.keep_from = keep_from  # a cut whose widths say how many channels each layer spares
        self.counts: list[int] | None = None
        self.mode, self.rank = mode, rank
        self.method = method(prune_method) if isinstance(prune_method, str) else prune_method
        self.s, self.schedule, self.decay_at, self.keep = s, schedule, decay_at, keep
        self.convs: list[int] = []
        self.bns: list[nn.BatchNorm2d] = []
        self.scales: list[torch.Tensor] = []
        self.units: Units | None = None  # --sr-rank layer: the channel groups of each layer
        self.history: list[tuple[int, torch.Tensor]] = []  # (epoch, |γ|) for the plot

    def inputs(self) -> list[str]:
        return [self.keep_from.source] if self.keep_from is not None else []

    def _gammas(self) -> torch.Tensor:
        return torch.cat([bn.weight.detach().flatten() for bn in self.bns])

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        if not self.bns:
            convs = sparse_convs(ctx.model, self.method)
            if not convs:
                raise UserError(f"-sr --prune-method {self.method.name}: {ctx.model.cfg.source} has no conv "
                                f"that {self.method.name} pruning ranks; choose another method")
            self.convs = convs
            self.bns = [ctx.model.layers[i].bn for i in convs]
            if self.rank == "layer":
                self.units = layer_units(ctx.model, convs)
            if self.keep_from is not None:
                self.counts = unit_keeps(ctx.model.cfg, self.method, self.keep_from)
        flat = sparsity_scale(self.schedule, self.s, epoch, ctx.epochs, self.decay_at, self.keep,
                              self._gammas(), self.units, self.method.group_score, self.counts)
        self.scales = list(flat.split([bn.num_features for bn in self.bns]))

    @torch.no_grad()
    def after_backward(self, ctx: TrainContext) -> None:
        if self.mode != "subgradient":
            return
        for bn, scale in zip(self.bns, self.scales):
            penalty = scale.to(bn.weight) * torch.sign(bn.weight)
            if bn.weight.grad is None:
                bn.weight.grad = penalty
            else:
                bn.weight.grad.add_(penalty)

    @torch.no_grad()
    def after_step(self, ctx: TrainContext) -> None:
        """The soft threshold; a γ it leaves at zero is zeroed in the weights' moving average too (what
        is evaluated and saved), which then stays zero while the γ does, instead of decaying towards it."""
        if self.mode != "proximal":
            return
        for conv, bn, scale in zip(self.convs, self.bns, self.scales):
            w = bn.weight
            w.copy_(torch.sign(w) * (w.abs() - scale.to(w) * ctx.schedule_lr).clamp_(min=0))
            if ctx.ema_model is not None:
                ctx.ema_model.layers[conv].bn.weight.masked_fill_(w == 0, 0.0)

    def on_epoch_end(self, ctx: TrainContext, epoch: int, result) -> None:
        if not ctx.main:
            return
        saved = ctx.ema_model if ctx.ema_model is not None else ctx.model  # what the checkpoint keeps
        g = torch.cat([saved.layers[i].bn.weight.detach().flatten() for i in self.convs]).abs().cpu()
        share, zero = float((g < SMALL).float().mean()), float((g == 0).float().mean())
        self.history.append((epoch, g))
        print(f"sparsity ({self.mode}): {len(self.bns)} batch norms, {g.numel()} channels, exactly zero "
              f"{zero:.1%}, |gamma| < {SMALL}: {share:.1%}, median |gamma| {g.median():.4f}")
        if ctx.writer is not None:
            ctx.writer.add_histogram("bn_gamma", g, epoch)
            ctx.writer.add_scalar("sparsity/share_zero", zero, epoch)
            ctx.writer.add_scalar("sparsity/share_below_0.01", share, epoch)
        if ctx.run_dir is not None:
            from utils.plots import plot_gamma_histograms

            plot_gamma_histograms([(f"epoch {e + 1}", v) for e, v in self.history], ctx.run_dir / "gamma.png")
