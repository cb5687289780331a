"""A float Darknet → its quantized model: which layers are quantized, which tensors share a scale.

Every tensor an integer pipeline stores has one scale: the outputs of convs and of combining layers
(``[shortcut]``, ``[scale_channels]``, ``[sam]``) are requantized by an :class:`ActQuant`; pass-through
layers (maxpool, upsample, dropout, a single-input route) keep their input's scale. Two tensors that a
``[shortcut]`` adds or a ``[route]`` concatenates must share one scale, so their producers get the
same :class:`ActQuant` (union-find over the layer graph). Which kind does what is the layer kind
table's (:mod:`models.kinds`: ``requantized``, ``shares_input_scales``).

Policy (:class:`QuantConfig`):

- by default the image stays float, so the first conv quantizes its weights but keeps a float bias,
  and the convs that feed ``[yolo]`` heads stay float (their input is quantized): the usual choice
  for accuracy, and what TensorRT's mixed precision runs;
- ``fpga=True`` quantizes everything: the image (its own observed scale), every conv including the
  heads, every bias on its ``s_in·s_w`` grid; and leaky-ReLU's slope becomes ``FPGA_LEAKY`` = 13/128
  (a multiply by 13 and a shift; darknet's 0.1 has no exact binary form), so that the integer
  pipeline of :mod:`quant.fpga` computes exactly what this model computes;
- ``target="ort"`` lays the model out as onnxruntime's CPU integer kernels compute it: the image and
  every conv (heads included) are quantized, each conv's pre-activation output gets its own quantizer
  (``QLinearConv`` requantizes before the activation, which ``QLinearLeakyRelu`` then requantizes),
  and every pass-through layer (maxpool, upsample, route) requantizes its output with its input's
  scale, a no-op in value that puts the Q/DQ pair onnxruntime needs in front of every integer
  kernel. The default ``target="trt"`` is TensorRT's layout: no quantizer between a conv and its
  activation, so TensorRT fuses the two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from models.darknet import Darknet
from models.graph import UnionFind
from models.kinds import OWN, kind_of
from models.layers import ConvBN
from models.quantized.modules import ActQuant, QConvBN, QuantSpec
from models.quantized.quantizers import fake_quantize
from models.shapes import IMAGE
from utils.errors import UserError

FPGA_LEAKY = (13, 7)  # leaky slope 13 / 2**7 = 0.1015625 under --FPGA
TARGETS = ("trt", "ort")  # the INT8 runtime the model is laid out for: TensorRT or onnxruntime (CPU)


@dataclass(frozen=True)
class QuantConfig:
    spec: QuantSpec = field(default_factory=QuantSpec)
    fpga: bool = False
    observer: str = "ema"  # activation ranges: ema (QAT) or a calibration method (PTQ)
    percentile: float = 99.99  # for the percentile calibration
    target: str = "trt"  # TARGETS

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"INT8 target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.fpga and self.target != "trt":
            raise ValueError("an FPGA model has its own integer layout (quant/fpga.py), not onnxruntime's")

    @property
    def everything(self) -> bool:
        """The image and the heads quantized too (FPGA, onnxruntime), not only the body."""
        return self.fpga or self.target == "ort"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        return cls(QuantSpec(**d["spec"]), d["fpga"], d["observer"], d.get("percentile", 99.99),
                   d.get("target", "trt"))


def quant_config(spec: QuantSpec, fpga: bool, target: str, **kw) -> QuantConfig:
    """A :class:`QuantConfig` from command-line choices; a combination that has no layout is a UserError
    naming the flags."""
    if target == "ort" and (fpga or spec.method != "google"):
        raise UserError(f"--int8-target ort: needs the google method without --FPGA (got "
                        f"{spec.method}{' --FPGA' if fpga else ''})")
    if target == "ort" and spec.a_symmetric:
        raise UserError("--int8-target ort --a-symmetric: onnxruntime's x86 integer kernels run uint8 "
                        "activations fastest; leave out --a-symmetric")
    return QuantConfig(spec, fpga=fpga, target=target, **kw)


class QOutput(nn.Module):
    """A combining layer (shortcut, scale_channels, sam) followed by the requantization of its output."""

    def __init__(self, layer: nn.Module, output_quant: ActQuant):
        super().__init__()
        self.layer, self.output_quant = layer, output_quant
        self.output_site = output_quant.claim_site()

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.output_quant(self.layer(*xs), self.output_site)


class QPass(nn.Module):
    """A pass-through layer (maxpool, upsample, route) whose output is requantized with its input's
    scale: the values are already on that grid, so this changes nothing but the exported graph, where
    it is the Q/DQ pair onnxruntime needs in front of the next integer kernel. It does not observe."""

    def __init__(self, layer: nn.Module, quant: ActQuant):
        super().__init__()
        self.layer = layer
        self.quant = [quant]  # a reference: the producer owns it

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        q = self.quant[0]
        return fake_quantize(self.layer(*xs), *q.qparams(), q.scheme)


def scale_owners(model: Darknet) -> tuple[list[int], UnionFind]:
    """For every layer, the layer whose quantizer sets its output's scale (``IMAGE`` for the image),
    and the union-find whose classes are the tensors that must share a scale."""
    owner: list[int] = []
    uf = UnionFind()
    for i, (b, srcs) in enumerate(zip(model.cfg.layers, model.inputs)):
        kind = kind_of(b)
        src_owner = [IMAGE if j == IMAGE else owner[j] for j in srcs]
        if kind.shares_input_scales:  # an add or a concat: its inputs share one scale
            for o in src_owner[1:]:
                uf.union(src_owner[0], o)
        owner.append(i if kind.requantized else src_owner[0])
    return owner, uf


def quantize_model(model: Darknet, config: QuantConfig) -> Darknet:
    """Swap the modules of ``model`` in place for their quantized versions; returns ``model``."""
    spec = config.spec
    owner, uf = scale_owners(model)
    head_convs = {model.inputs[h][0] for h in model.heads}
    quants: dict[int, ActQuant] = {}

    def quant_of(layer_owner: int) -> ActQuant | None:
        if layer_owner == IMAGE and not config.everything:
            return None
        root = uf.find(layer_owner)
        if root not in quants:
            quants[root] = spec.activation_quant(config.observer, config.percentile)
        return quants[root]

    image_quant = quant_of(IMAGE)
    if image_quant is not None:
        image_quant.claim_site()  # the image is its only producer
        model.input_quant = image_quant
    for i, (b, srcs) in enumerate(zip(model.cfg.layers, model.inputs)):
        layer = model.layers[i]
        if config.fpga and isinstance(getattr(layer, "act", None), nn.LeakyReLU):
            layer.act = nn.LeakyReLU(FPGA_LEAKY[0] / 2 ** FPGA_LEAKY[1])
        kind = kind_of(b)
        if kind.channels == OWN:
            in_q = quant_of(IMAGE if srcs[0] == IMAGE else owner[srcs[0]])
            if i in head_convs and not config.everything:
                continue  # float head conv on a quantized input
            assert isinstance(layer, ConvBN)
            out_q = None if i in head_convs and config.fpga else quant_of(i)
            # onnxruntime's QLinearConv takes a ReLU (or none) into its output quantizer; any other
            # activation runs as its own integer kernel between two quantized tensors
            preact = config.target == "ort" and not isinstance(layer.act, (nn.Identity, nn.ReLU))
            preact_q = spec.activation_quant(config.observer, config.percentile) if preact else None
            model.layers[i] = QConvBN(layer, spec, in_q, out_q, preact_q)
        elif kind.requantized:
            model.layers[i] = QOutput(layer, quant_of(i))
        elif config.target == "ort" and not kind.head:
            q = quant_of(owner[i])
            if q is not None:
                model.layers[i] = QPass(layer, q)
    model.quant_config = config
    return model


def freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QConvBN):
            m.freeze_bn()


def freeze_observers(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, ActQuant):
            for o in m.observers:
                o.frozen = True
