"""Quantization-aware training as a trainer hook: ``train.py --quantized google --w-bit 8 --a-bit 8``.

``prepare_model`` swaps the model's modules for quantized ones (:func:`quant.convert.quantize_model`)
before the optimizer and the EMA exist; at the start of epoch ``--freeze-bn-epoch`` the folded batch
norms switch to their running statistics, and at ``--freeze-observer-epoch`` the activation ranges stop
moving (Jacob et al., 2018: both late in training, so the last epochs train what inference computes).
Started from a PTQ checkpoint (``train.py --weights runs/ptq/x/quantized.pt --quantized ...``), QAT
keeps the calibrated activation ranges fixed and trains the weights under them: at 4 bits this
starts far better than moving averages of the batch extremes (README, Quantization).
"""

from __future__ import annotations

from torch import nn

from quant.convert import QuantConfig, freeze_bn, freeze_observers, quantize_model
from quant.modules import QuantSpec
from utils.errors import UserError
from utils.trainer import Trainer, TrainHook

METHODS = {1: "google", 2: "dorefa"}  # --quantized numbers, as the older tools' users know them


def method_name(value: str) -> str:
    """``--quantized``: a number or a name → the name."""
    names = {str(k): v for k, v in METHODS.items()} | {v: v for v in METHODS.values()}
    if value not in names:
        raise UserError(f"--quantized {value!r}: expected "
                        + ", ".join(f"{k} or {v}" for k, v in METHODS.items()))
    return names[value]


class QuantHook(TrainHook):
    def __init__(self, config: QuantConfig, freeze_bn_epoch: int, freeze_observer_epoch: int):
        self.config = config
        self.freeze_bn_epoch, self.freeze_observer_epoch = freeze_bn_epoch, freeze_observer_epoch

    calibrated = False  # the model came from PTQ: its ranges stay as calibrated

    def prepare_model(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        if model.quant_config is not None:  # a quantized checkpoint: keep going
            # a PTQ checkpoint (minmax/percentile/mse ranges) keeps its calibrated ranges: those
            # observers are not moving averages and would jump to each batch's extremes
            self.calibrated = model.quant_config.observer != "ema"
            return model
        return quantize_model(model, self.config)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if 0 <= self.freeze_bn_epoch <= epoch:
            freeze_bn(trainer.model)
        if self.calibrated or 0 <= self.freeze_observer_epoch <= epoch:
            freeze_observers(trainer.model)


def hook_from_options(opts) -> QuantHook:
    method = method_name(str(opts.quantized))
    try:  # DoReFa's activations keep leaky-ReLU's negative side (the signed variant)
        spec = QuantSpec(method, opts.w_bit, opts.a_bit, bn_fold=opts.bn_fold, pow2=opts.fpga,
                         a_symmetric=opts.a_symmetric or method == "dorefa", a_range=opts.dorefa_range)
    except ValueError as e:  # bit widths, or a combination DoReFa does not have
        flags = " --BN_Fold" * opts.bn_fold + " --FPGA" * opts.fpga
        raise UserError(f"--quantized {opts.quantized} --w-bit {opts.w_bit} --a-bit {opts.a_bit}{flags}: {e}"
                        ) from None
    return QuantHook(QuantConfig(spec, fpga=opts.fpga), opts.freeze_bn_epoch, opts.freeze_observer_epoch)
