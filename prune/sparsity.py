"""BN-L1 sparse training (Liu et al., 2017, "network slimming"): a trainer hook.

With ``train.py -sr --s S`` the sub-gradient of ``S · Σ|γ|`` is added to the batch-norm scales γ of
the selected convs once per optimizer step, after AMP unscaling and before gradient clipping::

    γ.grad += s_c · sign(γ)

so neither gradient accumulation nor the AMP loss scale changes its strength. ``--prune`` selects
the convs (:mod:`prune.blocks`): 0 those normal/regular pruning may cut, 1 also the convs tied by
shortcuts (shortcut/slim pruning), 2 the convs of removable residual blocks (layer pruning).

``--sr-schedule`` sets ``s_c`` in epoch ``e`` of ``E`` (decay point ``D = --sr-decay-at``,
local share ``K = --sr-keep``):

- ``constant``: ``s_c = S``;
- ``global``: ``s_c = S`` while ``e < D·E``, then ``S · 0.01`` for every channel;
- ``local``: ``s_c = S`` while ``e < D·E``; afterwards, at each epoch start, the share ``K`` of
  selected channels with the largest |γ| gets ``S · 0.01`` and the rest keep ``S``, so the important
  channels recover while the others keep shrinking.

Every epoch the hook logs a histogram of the selected γ to TensorBoard (``bn_gamma``), the share of
|γ| < 0.01 (``sparsity/share_below_0.01``), and redraws ``gamma.png`` in the run folder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.graph import ChannelGraph
from prune.blocks import channel_candidates, residual_blocks
from utils.errors import UserError
from utils.trainer import Trainer, TrainHook

SCHEDULES = ("constant", "global", "local")
DECAY = 0.01  # the factor of the decayed penalty
SMALL = 0.01  # |γ| below this counts as pruned in the logged share


def sparse_convs(model: nn.Module, mode: int) -> list[int]:
    """The conv layer indices whose γ ``--prune mode`` penalizes."""
    cfg = model.cfg
    if mode in (0, 1):
        return channel_candidates(ChannelGraph(cfg), include_tied=mode == 1)
    if mode == 2:
        return sorted({c for b in residual_blocks(cfg) for c in b.convs
                       if cfg.layers[c]["batch_normalize"]})
    raise UserError(f"--prune {mode}: expected 0 (normal/regular), 1 (shortcut/slim) or 2 (layer)")


def sparsity_scale(schedule: str, s: float, epoch: int, epochs: int, decay_at: float, keep: float,
                   gammas: torch.Tensor) -> torch.Tensor:
    """The per-channel penalty ``s_c`` for the flattened γ of all selected convs (see module doc)."""
    if schedule not in SCHEDULES:
        raise UserError(f"--sr-schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    scale = torch.full_like(gammas, s)
    if schedule == "constant" or epoch < decay_at * epochs:
        return scale
    if schedule == "global":
        return scale * DECAY
    n_keep = math.ceil(keep * gammas.numel())
    if n_keep:
        top = gammas.abs().topk(n_keep).indices
        scale[top] = s * DECAY
    return scale


class SparsityHook(TrainHook):
    """Adds ``s_c · sign(γ)`` to the γ gradients of the selected batch norms once per optimizer step."""

    def __init__(self, s: float, mode: int = 0, schedule: str = "constant", decay_at: float = 0.5,
                 keep: float = 0.15):
        if s < 0:
            raise UserError(f"--s {s}: the sparsity rate must be >= 0")
        if not 0 <= decay_at <= 1 or not 0 <= keep <= 1:
            raise UserError(f"--sr-decay-at {decay_at} and --sr-keep {keep} must be in [0, 1]")
        if schedule not in SCHEDULES:
            raise UserError(f"--sr-schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
        self.s, self.mode, self.schedule, self.decay_at, self.keep = s, mode, schedule, decay_at, keep
        self.bns: list[nn.BatchNorm2d] = []
        self.scales: list[torch.Tensor] = []
        self.history: list[tuple[int, torch.Tensor]] = []  # (epoch, |γ|) for the plot

    def _gammas(self) -> torch.Tensor:
        return torch.cat([bn.weight.detach().flatten() for bn in self.bns])

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if not self.bns:
            convs = sparse_convs(trainer.model, self.mode)
            if not convs:
                raise UserError(f"-sr --prune {self.mode}: {trainer.model.cfg.source} has no conv that "
                                f"this mode selects; try another --prune")
            self.bns = [trainer.model.layers[i].bn for i in convs]
        flat = sparsity_scale(self.schedule, self.s, epoch, trainer.opts.epochs, self.decay_at,
                              self.keep, self._gammas())
        self.scales = list(flat.split([bn.num_features for bn in self.bns]))

    @torch.no_grad()
    def after_backward(self, trainer: Trainer) -> None:
        for bn, scale in zip(self.bns, self.scales):
            penalty = scale.to(bn.weight) * torch.sign(bn.weight)
            if bn.weight.grad is None:
                bn.weight.grad = penalty
            else:
                bn.weight.grad.add_(penalty)

    def on_epoch_end(self, trainer: Trainer, epoch: int, result) -> None:
        if not trainer.main:
            return
        g = self._gammas().abs().cpu()
        share = float((g < SMALL).float().mean())
        self.history.append((epoch, g))
        print(f"sparsity: {len(self.bns)} batch norms, {g.numel()} channels, share |gamma| < {SMALL}: "
              f"{share:.1%}, median |gamma| {g.median():.4f}")
        writer = getattr(trainer, "writer", None)
        if writer is not None:
            writer.add_histogram("bn_gamma", g, epoch)
            writer.add_scalar("sparsity/share_below_0.01", share, epoch)
        if trainer.run_dir is not None:
            from utils.plots import plot_gamma_histograms

            plot_gamma_histograms([(f"epoch {e + 1}", v) for e, v in self.history],
                                  trainer.run_dir / "gamma.png")
