"""Quantized modules: a ``[convolutional]`` layer as an integer pipeline computes it.

:class:`ActQuant` quantizes a tensor with the range its :class:`~models.quantized.observers.Observer` keeps;
one instance may be shared by several layers, so tensors that are added or concatenated carry the
same scale (what integer hardware needs to join them without rescaling).

:class:`QConvBN` replaces :class:`~models.layers.ConvBN`. It keeps the same ``conv``/``bn``
parameters (so checkpoints keep their keys) and computes, with ``s_in`` the scale of its input
(the producer's :class:`ActQuant`) and ``s_w`` the weight scale per output channel:

- **weights**: Google (Jacob et al., 2018) symmetric per-channel or per-tensor, or DoReFa;
- **BN folding** (Jacob et al., section 3.2): ``W_f = W·γ/σ``, ``b_f = β − γ·μ/σ``. While BN still
  trains, ``σ``/``μ`` in ``W_f`` are the running statistics and the output is corrected by
  ``σ/σ_B`` and the batch mean, so the forward pass matches conv + BN on the batch; after
  :meth:`freeze_bn` the running statistics are used alone, which is what inference computes;
- **bias**: ``round(b_f / (s_in·s_w))`` as int32, so the accumulator adds it with no rescale;
- then, in onnxruntime's layout only, the pre-activation :class:`ActQuant` (``preact_quant``);
- then the activation, then the output :class:`ActQuant` (when this layer's output is quantized).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import ConvBN
from models.quantized.observers import Observer
from models.quantized.quantizers import (
    Scheme,
    constant,
    dorefa_weights,
    fake_quantize,
    integers,
    pow2_ceil,
    round_ste,
    scale_zero_point,
)

WEIGHT_METHODS = ("google", "dorefa")
BIAS_CODE_LIMIT = 2.0 ** 30  # the largest bias code a weight scale may lead to (int32, with a margin)


@dataclass(frozen=True)
class QuantSpec:
    method: str = "google"  # weights: google (symmetric, observed range) or dorefa
    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = True
    bn_fold: bool = True
    pow2: bool = False  # every scale a power of two (FPGA)
    a_symmetric: bool = False  # activations: affine (uint8-style) unless symmetric; DoReFa: signed
    a_range: float = 1.0  # DoReFa: activations clamped to [0, r] (signed: [−r, r]); the paper's r is 1

    def activation_quant(self, observer: str = "ema", percentile: float = 99.99) -> ActQuant:
        """A new activation quantizer: observed (Google), or DoReFa's fixed [0, r] / [−r, r]."""
        if self.method == "dorefa":
            r = self.a_range
            return ActQuant(self.a_scheme, "fixed", (-r, r) if self.a_symmetric else (0.0, r))
        return ActQuant(self.a_scheme, observer, percentile=percentile)

    def __post_init__(self):
        if self.method not in WEIGHT_METHODS:
            raise ValueError(f"quantization method {self.method!r}: expected one of {WEIGHT_METHODS}")
        if self.method == "dorefa" and (self.bn_fold or self.pow2):
            # DoReFa's weights are normalised to [−1, 1] (the BN after the conv restores the scale,
            # a folded BN would be lost) and its grids are 1/(2^k − 1), not powers of two
            raise ValueError("DoReFa keeps the batch norm after the conv and has fixed 1/(2^k-1) grids: "
                             "BN folding and power-of-two scales need the google method")
        if not self.a_range > 0:
            raise ValueError(f"DoReFa activation range {self.a_range}: must be > 0")
        Scheme(self.w_bits)  # validates the bit widths
        Scheme(self.a_bits)

    @property
    def w_scheme(self) -> Scheme:
        return Scheme(self.w_bits, symmetric=True, pow2=self.pow2)

    @property
    def a_scheme(self) -> Scheme:
        return Scheme(self.a_bits, symmetric=self.a_symmetric, pow2=self.pow2)


class ActQuant(nn.Module):
    """Fake-quantizes tensors with one scale, from the observed ranges (observed while training).

    One instance is shared by every producer whose outputs are added or concatenated. Each producer
    is a *site* with its own observer, and the scale covers the union of the sites' ranges, so no
    joined tensor is clipped by another's smaller range.

    DoReFa's activation quantizers are this with a fixed range: ``[0, r]`` on the affine grid is
    ``r·quantize_k(clamp(x/r, 0, 1))``, and ``[−r, r]`` on the symmetric grid is the signed variant
    that keeps leaky-ReLU's negatives (tested against :func:`models.quantized.quantizers.dorefa_activations`).
    The paper's ``r`` is 1, for activations bounded by design; a trained darknet model's leaky
    outputs reach 5–20, so fine-tuning one needs a wider ``r`` (``--dorefa-range``).
    """

    def __init__(self, scheme: Scheme, method: str = "ema", fixed: tuple[float, float] | None = None,
                 percentile: float = 99.99):
        super().__init__()
        self.scheme = scheme
        self._observer_args = {"method": method, "percentile": percentile, "fixed": fixed}
        self.observers = nn.ModuleList([Observer(**self._observer_args)])
        self._claimed = 0

    def claim_site(self) -> int:
        """A site index for one more producer (the first one uses the observer made with the quantizer)."""
        if self._claimed == len(self.observers):
            self.observers.append(Observer(**self._observer_args))
        self._claimed += 1
        return self._claimed - 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([o.lo for o in self.observers]).amin(0),
                torch.stack([o.hi for o in self.observers]).amax(0))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return scale_zero_point(*self.range(), self.scheme)

    def forward(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        if self.training:
            self.observers[site](x)
        scale, zp = self.qparams()
        return fake_quantize(x, scale, zp, self.scheme)


class QConvBN(nn.Module):
    def __init__(self, layer: ConvBN, spec: QuantSpec, input_quant: ActQuant | None,
                 output_quant: ActQuant | None, preact_quant: ActQuant | None = None):
        super().__init__()
        self.conv, self.bn, self.act = layer.conv, layer.bn, layer.act
        self.stop_gradient = layer.stop_gradient
        self.spec = spec
        self.input_quant = [input_quant]  # a reference, not a submodule: the producer owns it
        # onnxruntime's layout: the conv's output is requantized before the activation (its own scale)
        self.preact_quant = preact_quant
        if preact_quant is not None:
            preact_quant.claim_site()
        self.output_quant = output_quant
        self.output_site = output_quant.claim_site() if output_quant is not None else 0
        self.bn_frozen = False
        self.fold = spec.bn_fold and isinstance(self.bn, nn.BatchNorm2d)

    def freeze_bn(self) -> None:
        """From now on fold with the running statistics and stop updating them (Jacob et al.)."""
        self.bn_frozen = True

    # ------------------------------------------------------------ the folded parameters
    def _folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_f, b_f, σ) with the running statistics, or the raw conv when not folding."""
        w = self.conv.weight
        if not self.fold:
            b = self.conv.bias if self.conv.bias is not None else w.new_zeros(w.shape[0])
            return w, b, w.new_ones(w.shape[0])
        bn = self.bn
        sigma = torch.sqrt(bn.running_var + bn.eps)
        w_f = w * (bn.weight / sigma).view(-1, 1, 1, 1)
        b_f = bn.bias - bn.weight * bn.running_mean / sigma
        return w_f, b_f, sigma

    def weight_scale(self, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """From the weights' current range: per output channel, or one for the conv.

        A channel whose weights are all zero (a batch norm γ that sparse training zeroed, folded in)
        has no range: it takes the conv's largest channel scale (1 if every channel is zero). With the
        bias ``b`` of a conv on a quantized input, no scale is so small that the bias's codes on the
        ``s_in·s_w`` grid leave int32's range (a γ near zero: its weights round to zero instead)."""
        if self.spec.per_channel:
            flat = w.flatten(1)
            lo, hi = flat.amin(1), flat.amax(1)
        else:
            lo, hi = w.min(), w.max()
        scale, _ = scale_zero_point(lo, hi, self.spec.w_scheme)
        empty = (lo == 0) & (hi == 0)
        if empty.any():
            fallback = scale[~empty].max() if (~empty).any() else torch.ones_like(scale).max()
            scale = torch.where(empty, fallback, scale)
        inq = self.input_quant[0]
        if b is not None and inq is not None:
            floor = b.detach().abs() / (inq.qparams()[0] * BIAS_CODE_LIMIT)
            floor = floor if self.spec.per_channel else floor.max()
            if bool((floor > scale).any()):
                scale = torch.maximum(scale, floor)
                if self.spec.w_scheme.pow2:
                    scale = pow2_ceil(scale)
        return scale

    def quantized_weight(self, w: torch.Tensor, b: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fake-quantized weights, per-channel scale or None for DoReFa's fixed [−1, 1] grid); ``b``:
        the bias that will go on the ``s_in·s_w`` grid (:meth:`weight_scale`)."""
        if self.spec.method == "dorefa":
            return dorefa_weights(w, self.spec.w_bits), None
        scale = self.weight_scale(w.detach(), b)
        axis = 0 if self.spec.per_channel else None
        return fake_quantize(w, scale, torch.zeros_like(scale), self.spec.w_scheme, axis), scale

    def quantized_bias(self, b: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
        """``b`` rounded to integer multiples of ``s_in·s_w`` (float when either scale is unknown)."""
        inq = self.input_quant[0]
        if inq is None or w_scale is None:
            return b
        s_in, _ = inq.qparams()
        step = s_in * w_scale.expand_as(b)
        return round_ste(b / step) * step

    def inference_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake-quantized weights, bias on the ``s_in·s_w`` grid) with the running statistics.

        While ``torch.onnx.export`` traces, the folded float weights and the rounded bias are
        constants, so the graph holds them as initializers with the weights' QuantizeLinear/
        DequantizeLinear pair, and none of the folding arithmetic."""
        w_f, b_f, _ = self._folded()
        if torch.onnx.is_in_onnx_export():
            with torch.no_grad():
                s_w = self.quantized_weight(w_f, b_f)[1]
                b = constant(self.quantized_bias(b_f, s_w))
            return self.quantized_weight(constant(w_f), constant(b_f))[0], b
        w_q, s_w = self.quantized_weight(w_f, b_f)
        return w_q, self.quantized_bias(b_f, s_w)

    @torch.no_grad()
    def integer_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What an integer pipeline stores: (weight codes, weight scale ``s_w``, bias codes on the
        ``s_in·s_w`` grid, or None when the input is float), from the running statistics."""
        w_f, b_f, _ = self._folded()
        _, s_w = self.quantized_weight(w_f, b_f)
        if s_w is None:
            raise ValueError("DoReFa weights have no integer scale of their own")
        axis = 0 if self.spec.per_channel else None
        codes = integers(w_f, s_w, torch.zeros_like(s_w), self.spec.w_scheme, axis)
        inq = self.input_quant[0]
        if inq is None:
            return codes, s_w, None
        step = inq.qparams()[0] * s_w
        return codes, s_w, torch.round(self.quantized_bias(b_f, s_w) / step)

    # ------------------------------------------------------------ forward
    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold and self.training and not self.bn_frozen:
            y = self._folded_train(x)
        else:
            y = self._conv(x, *self.inference_params())
            if not self.fold:
                y = self.bn(y)
        if self.preact_quant is not None:
            y = self.preact_quant(y)
        y = self.act(y)
        if self.output_quant is not None:
            y = self.output_quant(y, self.output_site)
        return y.detach() if self.stop_gradient and self.training else y

    def _folded_train(self, x: torch.Tensor) -> torch.Tensor:
        """Jacob et al.'s training graph: batch statistics from a float conv, weights folded with the
        running σ and quantized, the output corrected by σ/σ_B, the running statistics updated.

        The gradient flows through the batch statistics as it does through batch normalization. Taken
        as constants, they would let every step move the weights along directions that the next batch's
        statistics cancel in training but the running ones do not: an INT8 model that trains well and
        evaluates near zero (seen after one QAT epoch with BN not yet frozen)."""
        bn = self.bn
        y_float = self._conv(x, self.conv.weight, None)
        mean_b = y_float.mean((0, 2, 3))
        var_b = y_float.var((0, 2, 3), unbiased=False)
        with torch.no_grad():
            n = y_float.numel() / y_float.shape[1]
            bn.running_mean.mul_(1 - bn.momentum).add_(bn.momentum * mean_b)
            bn.running_var.mul_(1 - bn.momentum).add_(bn.momentum * var_b * n / max(n - 1, 1))
            bn.num_batches_tracked += 1
        sigma = torch.sqrt(bn.running_var + bn.eps)
        sigma_b = torch.sqrt(var_b + bn.eps)
        w_f = self.conv.weight * (bn.weight / sigma).view(-1, 1, 1, 1)
        w_q, _ = self.quantized_weight(w_f)
        y = self._conv(x, w_q, None) * (sigma / sigma_b).view(1, -1, 1, 1)
        return y + (bn.bias - bn.weight * mean_b / sigma_b).view(1, -1, 1, 1)

