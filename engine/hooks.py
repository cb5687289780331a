"""How a technique joins the training loop: a :class:`TrainHook` and the :class:`TrainContext` it sees.

A hook can

- ``inputs``: name the files it reads, which the run must never write over;
- ``prepare_model``: swap modules (QAT) or attach what it needs (a distillation teacher), before the
  optimizer and the EMA exist;
- ``parameters``: own trainable parameters outside the model (a distillation adaptation layer): the
  optimizer trains them with the model, gradient clipping includes them, and ``state_dict`` /
  ``load_state_dict`` carry them through a resume; they are never part of the saved model;
- ``on_epoch_start``: freeze BN statistics or observers on a schedule;
- ``extra_losses``: add loss terms (distillation) given the batch, the raw predictions and the
  detection loss with its matched positions;
- ``after_backward``: touch gradients once per optimizer step, after AMP unscaling and before the step
  (the older tools' BN-L1 sub-gradient);
- ``after_step``: touch weights once per optimizer step that was taken, before the EMA copies them (the
  BN-L1 proximal step);
- ``on_epoch_end``: see the epoch's metrics.

It reads the run only through the context: the model, the device, the epoch count and image sizes,
the AMP state, the detection loss's gains, the TensorBoard writer, the run folder and whether this is
the main process. Nothing else of the trainer is a hook's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.evaluate import EvalResult
from utils.loss import LossOutput


@dataclass(frozen=True)
class LossGains:
    """The detection loss's weights: a hook that adds a term scales it like its detection counterpart."""
    box: float
    obj: float
    cls: float


@dataclass
class TrainContext:
    model: nn.Module  # the model being trained (not a DDP wrapper); a hook's prepare_model may replace it
    device: torch.device
    epochs: int
    sizes: tuple[int, int, int]  # (min train, max train, test) image sizes
    amp: bool
    gains: LossGains
    main: bool  # the process that writes files and prints (rank 0, or the only one)
    run_dir: Path | None = None  # None on the other processes
    writer: Any = None  # TensorBoard SummaryWriter while the run is fitting (main process only)
    # hyp lr0 times the learning-rate schedule (warm-up, cosine) at the current optimizer step: the step
    # SGD takes, the same number whichever optimizer runs (Adam runs at a tenth of it)
    schedule_lr: float = 0.0
    batches: int = 0  # training batches per epoch (on this process)
    # the exponential moving average of the weights (what is evaluated and saved), None without --ema;
    # ``after_step`` runs before it takes the step's weights in
    ema_model: nn.Module | None = None


class TrainHook:
    """Base class: override what you need."""

    def inputs(self) -> list[str]:
        """Files the technique reads (a teacher's weights): the run never writes over them."""
        return []

    def prepare_model(self, ctx: TrainContext, model: nn.Module) -> nn.Module:
        return model

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the hook owns outside the model (trained, clipped, never saved in it)."""
        return []

    def state_dict(self) -> dict:
        """What a resumed run needs back (kept in ``last.pt``'s training state, not in the model)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        pass

    def extra_losses(self, ctx: TrainContext, imgs: torch.Tensor, targets: torch.Tensor,
                     preds: list[torch.Tensor], loss: LossOutput) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, ctx: TrainContext) -> None:
        pass

    def after_step(self, ctx: TrainContext) -> None:
        pass

    def on_epoch_end(self, ctx: TrainContext, epoch: int, result: EvalResult | None) -> None:
        pass
