"""Uniform quantizers with straight-through gradients, and the ranges (observers) that set them.

A quantizer maps ``x`` to ``s · (q − z)`` with integer ``q = clamp(round(x/s) + z, qmin, qmax)``, rounded
half to even before the zero point is added (ONNX's QuantizeLinear, and what an integer pipeline
does; PyTorch's own fake-quantize adds ``z`` first, which breaks ties differently for odd ``z``):

- **symmetric** (signed): ``z = 0``, ``q ∈ [−(2^(b−1) − 1), 2^(b−1) − 1]`` (the narrow range, so
  that ``−q`` always exists: TensorRT's int8 and Jacob et al.'s weights);
- **affine** (unsigned, Jacob et al., 2018): ``q ∈ [0, 2^b − 1]`` and an integer zero point ``z``
  that represents 0.0 exactly;
- **power of two** (for FPGAs, which rescale by shifting): ``s`` is rounded *up* to ``2^k``, so the
  observed range still fits.

The gradient is the straight-through estimator restricted to the range: 1 where
``qmin ≤ x/s + z ≤ qmax``, 0 outside (the clamp's gradient), as in Jacob et al. and PyTorch's
fake-quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass(frozen=True)
class Scheme:
    bits: int = 8
    symmetric: bool = True
    pow2: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"{self.bits} bits: expected one of {', '.join(map(str, BITS))}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ≥ ``scale`` (elementwise, exact: built with ldexp)."""
    exponent = torch.ceil(torch.log2(scale.double())).to(torch.int32)
    return torch.ldexp(torch.ones_like(scale), exponent).to(scale.dtype)


def scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that cover ``[lo, hi]`` (per tensor or per channel).

    The range is widened to contain 0, so zero (padding, ReLU's floor) is exact.
    """
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    tiny = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        scale = torch.maximum(-lo, hi) / scheme.qmax
        scale = scale.clamp(min=tiny * 1e6)
        if scheme.pow2:
            scale = pow2_ceil(scale)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp(min=tiny * 1e6)
    if scheme.pow2:
        scale = pow2_ceil(scale)
    zero_point = torch.clamp(torch.round(scheme.qmin - lo / scale), scheme.qmin, scheme.qmax)
    return scale, zero_point


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        q = torch.round(x / scale) + zero_point  # ONNX's QuantizeLinear: round, then z
        # the gradient passes where the rounded code is on the grid (PyTorch's rule): a weight at its
        # channel's maximum lands on qmax exactly, though x / scale may exceed it by a rounding error
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        q = torch.clamp(q, qmin, qmax)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def _along(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale``/``zero_point`` shaped to broadcast over ``x``, one value per slice of ``axis``."""
    if axis is None:
        return scale, zero_point
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.view(shape), zero_point.view(shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme,
                  axis: int | None = None) -> torch.Tensor:
    """Quantize and dequantize ``x``; with ``axis``, ``scale``/``zero_point`` are per slice of it.

    While ``torch.onnx.export`` traces, this is PyTorch's own fake-quantize op instead, with the scale
    and zero point as constants, which the exporter writes as a QuantizeLinear/DequantizeLinear pair.
    """
    if torch.onnx.is_in_onnx_export():
        return _qdq(x, scale, zero_point, scheme, axis)
    scale, zero_point = _along(x, scale, zero_point, axis)
    return _FakeQuantize.apply(x, scale, zero_point, scheme.qmin, scheme.qmax)


def constant(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that a trace records as a constant, not as ops on the module state it came from."""
    return torch.from_numpy(t.detach().cpu().numpy().copy())


def _qdq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme, axis: int | None
         ) -> torch.Tensor:
    """The ONNX form of :func:`fake_quantize`: int8 (symmetric) or uint8 (affine) codes.

    ONNX has no narrow int8 range, so the symmetric grid is written as [−128, 127]; codes of −128 need
    ``x < −127.5·s``, which a range that covers ``|x|`` (the weights' max, an observed activation
    range) does not produce.
    """
    if scheme.bits != 8:
        raise ValueError(f"{scheme.bits}-bit quantization has no ONNX QuantizeLinear form (8 bits only)")
    qmin, qmax = (-128, 127) if scheme.symmetric else (0, 255)
    # constants in the exported graph, not ops on the observer buffers
    scale, zero_point = constant(scale).float(), constant(zero_point).int()
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


def integers(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme,
             axis: int | None = None) -> torch.Tensor:
    """The integer codes ``q`` themselves (what an integer pipeline stores)."""
    scale, zero_point = _along(x, scale, zero_point, axis)
    return torch.clamp(torch.round(x / scale) + zero_point, scheme.qmin, scheme.qmax)


# ---------------------------------------------------------------- DoReFa (Zhou et al., 2016)
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` with the gradient of the identity."""
    return _RoundSTE.apply(x)


def dorefa_quantize_unit(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's ``quantize_k`` on [0, 1]: ``round((2^k − 1)·x) / (2^k − 1)``, gradient passed through."""
    n = 2 ** bits - 1
    return round_ste(x * n) / n


def dorefa_weights(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``2·quantize_k(tanh(w) / (2·max|tanh(w)|) + 1/2) − 1``: 2^k levels in [−1, 1]."""
    t = torch.tanh(w)
    return 2 * dorefa_quantize_unit(t / (2 * t.abs().max().clamp(min=1e-12)) + 0.5, bits) - 1


def dorefa_activations(x: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """``quantize_k(clamp(x, 0, 1))``. ``signed`` keeps leaky-ReLU's negatives: ``clamp(x, −1, 1)``
    on the symmetric grid ``round(x·n)/n`` with ``n = 2^(k−1) − 1``, so 0 stays exact (2^k − 1 levels;
    the unsigned grid moved to [−1, 1] would have no zero). The gradient is 1 inside the clamp, 0 out."""
    if signed:
        n = 2 ** (bits - 1) - 1
        return round_ste(torch.clamp(x, -1.0, 1.0) * n) / n
    return dorefa_quantize_unit(torch.clamp(x, 0.0, 1.0), bits)


def log2_exact(x: torch.Tensor) -> bool:
    """True when every element is an exact power of two."""
    m, _ = torch.frexp(x.double())
    return bool(((m == 0.5) | (x == 0)).all())
