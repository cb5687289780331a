"""Range observers: what sets a quantizer's ``[lo, hi]``.

- ``ema`` (Jacob et al., 2018, for QAT): ``lo ← m·lo + (1 − m)·min(x)`` per batch (the first batch
  sets it), until frozen;
- ``minmax`` (calibration): the running minimum and maximum over every batch seen;
- ``percentile`` (calibration): the ``p`` and ``100 − p`` percentiles of a sample of the values;
- ``mse`` (calibration): the clipping range ``[lo·f, hi·f]`` whose fake-quantized sample has the
  least squared error, searched over ``f ∈ (0, 1]`` of the observed range;
- ``fixed``: a range set once and never observed (DoReFa's ``[0, r]`` or ``[−r, r]``).

A frozen observer keeps its range, except one frozen before it saw anything: the first batch still
sets that range, so freezing from the first epoch cannot leave a quantizer with an empty range.

Percentile and MSE keep a bounded random sample of the values (``SAMPLE`` per batch), which is
what calibration on a few hundred images needs without storing whole activations.
"""

from __future__ import annotations

import torch
from torch import nn

from models.quantized.quantizers import Scheme, fake_quantize, scale_zero_point

METHODS = ("ema", "minmax", "percentile", "mse", "fixed")
SAMPLE = 1 << 14


class Observer(nn.Module):
    def __init__(self, method: str = "ema", momentum: float = 0.99, percentile: float = 99.99,
                 channels: int | None = None, fixed: tuple[float, float] | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"observer {method!r}: expected one of {', '.join(METHODS)}")
        if channels is not None and method in ("percentile", "mse"):
            raise ValueError(f"observer {method!r} is per tensor; weights use minmax per channel")
        self.method, self.momentum, self.percentile = method, momentum, percentile
        self.channels = channels
        shape = (channels,) if channels else ()
        self.register_buffer("lo", torch.zeros(shape))
        self.register_buffer("hi", torch.zeros(shape))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        if method == "fixed":
            if fixed is None:
                raise ValueError("a fixed observer needs its range")
            self.lo.fill_(fixed[0])
            self.hi.fill_(fixed[1])
        self.frozen = method == "fixed"
        self._samples: list[torch.Tensor] = []
        self._generator: torch.Generator | None = None

    def _extrema(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels:  # axis 0 (conv weights: output channels)
            flat = x.detach().flatten(1)
            return flat.amin(1), flat.amax(1)
        return x.detach().min(), x.detach().max()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        if self.frozen and (self.seen > 0 or self.method == "fixed"):
            return  # frozen before any batch (--freeze-observer-epoch 0): the first batch still sets it
        lo, hi = self._extrema(x)
        first = self.seen == 0
        if self.method == "ema" and not first:
            m = self.momentum
            self.lo.mul_(m).add_((1 - m) * lo)
            self.hi.mul_(m).add_((1 - m) * hi)
        elif self.method == "minmax" and not first:
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
        else:
            self.lo.copy_(lo)
            self.hi.copy_(hi)
        if self.method in ("percentile", "mse"):
            flat = x.detach().flatten().float()
            if flat.numel() > SAMPLE:  # seeded per observer: the same images calibrate the same ranges
                if self._generator is None or self._generator.device != flat.device:
                    self._generator = torch.Generator(flat.device).manual_seed(0)
                pick = torch.randint(flat.numel(), (SAMPLE,), device=flat.device, generator=self._generator)
                flat = flat[pick]
            self._samples.append(flat.cpu())
        self.seen += 1

    @torch.no_grad()
    def calibrated_range(self, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
        """The range to quantize with: the observed one, or the percentile/MSE choice from the sample."""
        if self.method in ("ema", "minmax") or not self._samples:
            return self.lo.clone(), self.hi.clone()
        values = torch.cat(self._samples)
        if self.method == "percentile":
            q = torch.tensor([(100 - self.percentile) / 100, self.percentile / 100])
            lo, hi = torch.quantile(values[: 1 << 24], q)
            return lo, hi
        return mse_range(values, self.lo.cpu(), self.hi.cpu(), scheme)


def mse_range(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme, steps: int = 100
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrink ``f·[lo, hi]`` (f in (0, 1]) whose quantization of ``values`` has the least MSE."""
    best, best_f = None, 1.0
    for k in range(1, steps + 1):
        f = k / steps
        scale, zp = scale_zero_point(lo * f, hi * f, scheme)
        err = (fake_quantize(values, scale, zp, scheme) - values).pow(2).mean()
        if best is None or err < best:
            best, best_f = err, f
    return lo * best_f, hi * best_f
