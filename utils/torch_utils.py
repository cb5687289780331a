"""Torch helpers that are not part of any one model: BN re-calibration, tame random weights, timing."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BN's running mean and variance as the plain average over ``batches``.

    Weights are untouched; the model's train/eval mode and BN momenta are restored afterwards.
    Returns the number of batches used.
    """
    bns = _batchnorms(model)
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    n = 0
    try:
        for x in batches:
            model(x)
            n += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return n


@torch.no_grad()
def tame_random_weights(model: nn.Module, seed: int = 0, img_size: int = 64,
                        channels: int = 3) -> nn.Module:
    """Random weights for tests and benchmarks whose outputs are well conditioned at any depth.

    Convs followed by BN get He-normal weights ×10, so their outputs have variance near 100 and the
    BN epsilon (1e-5 here, 1e-6 in OpenCV) is negligible beside it. BN gammas are drawn in
    [0.4, 0.6] and betas in [-0.5, 1]: the network is contractive rather than chaotic, so float32
    rounding does not grow with depth. Running statistics are calibrated on random images, and
    convs without BN (the heads) get small weights, so objectness and classes spread over (0, 1).
    Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
            if m.bias is None:
                m.weight.mul_(10.0)
            else:
                m.weight.mul_(0.1)
                nn.init.uniform_(m.bias, -0.5, 0.5, generator=gen)
    for bn in _batchnorms(model):
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 0.2 + 0.4)
        bn.bias.copy_(torch.rand(bn.num_features, generator=gen) * 1.5 - 0.5)
    recalibrate_bn(model, [torch.rand(2, channels, img_size, img_size, generator=gen)])
    return model.eval()


def select_device(device: str = "") -> torch.device:
    """``""``/``"cpu"``/``"0"``/``"cuda:1"`` -> a torch device; asking for CUDA without one is an error."""
    from utils.errors import UserError

    d = str(device).strip().lower()
    if d in ("", "cpu"):
        return torch.device("cpu")
    if d.isdigit():
        d = f"cuda:{d}"
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        return torch.device(d)
    raise UserError(f"--device {device}: expected cpu, a GPU index like 0, or cuda:N")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel/DistributedDataParallel, or the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) else model


class ModelEMA:
    """Exponential moving average of a model's weights; the ramp keeps early averages from lagging."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        import copy

        self.ema = copy.deepcopy(unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        state = unwrap(model).state_dict()
        done = set()  # a module shared by several layers (a quantizer) appears under several keys
        for k, v in self.ema.state_dict().items():
            if v.data_ptr() in done:
                continue
            done.add(v.data_ptr())
            if v.dtype.is_floating_point:
                v.mul_(d).add_(state[k].detach(), alpha=1 - d)
            else:
                v.copy_(state[k])


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """The median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def alternating_medians(fns: list[Callable[[], object]], runs: int, warmup: int) -> list[float]:
    """Like :func:`median_ms` for several functions timed in turn, round after round, so drift in the
    machine's speed hits each of them alike: one median (ms) per function."""
    return [statistics.median(t) for t in alternating_times(fns, runs, warmup)]


def alternating_times(fns: list[Callable[[], object]], runs: int, warmup: int) -> list[list[float]]:
    """The milliseconds of each of ``runs`` rounds per function, the functions timed in turn."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + runs):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append((time.perf_counter() - t) * 1e3)
    return times
