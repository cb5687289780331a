"""Quantization-aware training as a trainer hook: ``train.py --quantized google --w-bit 8 --a-bit 8``.

``prepare_model`` swaps the model's modules for quantized ones
(:func:`models.quantized.convert.quantize_model`) before the optimizer and the EMA exist; at the start of
epoch ``--freeze-bn-epoch`` the folded batch norms switch to their running statistics, and at
``--freeze-observer-epoch`` the activation ranges stop moving (Jacob et al., 2018: both late in
training, so the last epochs train what inference computes).
Started from a PTQ checkpoint (``train.py --weights runs/ptq/x/quantized.pt --quantized ...``), QAT
keeps the calibrated activation ranges fixed and trains the weights under them: at 4 bits this
starts far better than moving averages of the batch extremes (README, Quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from engine.hooks import TrainContext, TrainHook
from models.quantized.convert import (
    TARGETS,
    QuantConfig,
    freeze_bn,
    freeze_observers,
    quant_config,
    quantize_model,
)
from models.quantized.modules import QuantSpec
from utils.cli import BITS, EPOCH_OR_NEVER, POSITIVE, option, refuse_unused
from utils.errors import UserError

METHODS = {1: "google", 2: "dorefa"}  # --quantized numbers, as the older tools' users know them


def method_name(value: str) -> str:
    """``--quantized``: a number or a name → the name."""
    names = {str(k): v for k, v in METHODS.items()} | {v: v for v in METHODS.values()}
    if value not in names:
        raise UserError(f"--quantized {value!r}: expected "
                        + ", ".join(f"{k} or {v}" for k, v in METHODS.items()))
    return names[value]


@dataclass
class QuantOptions:
    """``train.py``'s quantization-aware training flags; :meth:`hook` is the hook they ask for."""
    quantized: str = option("", "--quantized", metavar="1|google|2|dorefa",
                            help="1 or google: Jacob et al. scales; 2 or dorefa: DoReFa")
    w_bit: int = option(8, "--w-bit", type=BITS, help="weight bits (2-8 or 16)")
    a_bit: int = option(8, "--a-bit", type=BITS, help="activation bits (2-8 or 16)")
    bn_fold: bool = option(False, "--BN_Fold", "--bn-fold", "--BN_Flod",
                           help="fold batch norms into the quantized weights (Jacob et al.)")
    fpga: bool = option(False, "--FPGA", "--fpga",
                        help="power-of-two scales and every layer quantized, image and heads included")
    a_symmetric: bool = option(False, "--a-symmetric",
                               help="google: symmetric signed activations with zero point 0 (what TensorRT "
                                    "runs) instead of affine uint8-style ones")
    int8_target: str = option("trt", "--int8-target", choices=TARGETS,
                              help="google: the INT8 runtime the model is laid out for: trt (TensorRT, with "
                                   "--a-symmetric) or ort (onnxruntime's CPU integer kernels)")
    dorefa_range: float = option(8.0, "--dorefa-range", type=POSITIVE,
                                 help="DoReFa: activations are clamped to [-r, r] (the paper's r is 1)")
    freeze_bn_epoch: int = option(-1, "--freeze-bn-epoch", type=EPOCH_OR_NEVER,
                                  help="from this epoch folded BNs use their running statistics (-1: never)")
    freeze_observer_epoch: int = option(-1, "--freeze-observer-epoch", type=EPOCH_OR_NEVER,
                                        help="from this epoch activation ranges stop moving (-1: never)")

    def check(self) -> None:
        refuse_unused(self, bool(self.quantized), "--quantized 1|google|2|dorefa", exempt=("quantized",))

    def hook(self) -> QuantHook | None:
        return hook_from_options(self) if self.quantized else None


class QuantHook(TrainHook):
    def __init__(self, config: QuantConfig, freeze_bn_epoch: int, freeze_observer_epoch: int):
        self.config = config
        self.freeze_bn_epoch, self.freeze_observer_epoch = freeze_bn_epoch, freeze_observer_epoch

    calibrated = False  # the model came from PTQ: its ranges stay as calibrated

    def prepare_model(self, ctx: TrainContext, model: nn.Module) -> nn.Module:
        if model.quant_config is not None:  # a quantized checkpoint: keep going
            # a PTQ checkpoint (minmax/percentile/mse ranges) keeps its calibrated ranges: those
            # observers are not moving averages and would jump to each batch's extremes
            self.calibrated = model.quant_config.observer != "ema"
            return model
        return quantize_model(model, self.config)

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        if 0 <= self.freeze_bn_epoch <= epoch:
            freeze_bn(ctx.model)
        if self.calibrated or 0 <= self.freeze_observer_epoch <= epoch:
            freeze_observers(ctx.model)


def hook_from_options(opts: QuantOptions) -> QuantHook:
    method = method_name(str(opts.quantized))
    try:  # DoReFa's activations keep leaky-ReLU's negative side (the signed variant)
        spec = QuantSpec(method, opts.w_bit, opts.a_bit, bn_fold=opts.bn_fold, pow2=opts.fpga,
                         a_symmetric=opts.a_symmetric or method == "dorefa", a_range=opts.dorefa_range)
    except ValueError as e:  # bit widths, or a combination DoReFa does not have
        flags = " --BN_Fold" * opts.bn_fold + " --FPGA" * opts.fpga
        raise UserError(f"--quantized {opts.quantized} --w-bit {opts.w_bit} --a-bit {opts.a_bit}{flags}: {e}"
                        ) from None
    return QuantHook(quant_config(spec, opts.fpga, opts.int8_target), opts.freeze_bn_epoch,
                     opts.freeze_observer_epoch)
