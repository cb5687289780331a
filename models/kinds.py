"""One table of layer kinds: what each darknet section type means, for every part of the suite.

A :class:`LayerKind` says everything a walker over the layers needs about one section type:

- **cfg**: its options with darknet's defaults (``schema``), keys darknet has that this project
  cannot reproduce (``unsupported``), other names darknet accepts (``aliases``), checks within one
  block (``check``), and defaults written out even when the file left them implicit;
- **wiring**: the keys that hold layer indices (``references``: read by the graph, renumbered by layer
  pruning) and whether the previous layer is its first input (``reads_previous``);
- **shapes**: its output shape from its inputs' shapes, with the checks across blocks (``shape``);
- **the module** that computes it (``module``, from :mod:`models.layers`);
- **channels**: ``OWN`` (a conv makes its output channels), ``PASS`` (its input's channels, perhaps
  resized), ``CONCAT`` (a route: the inputs' channels in order, a ``groups`` slice of each) or
  ``COMBINE`` (channel c of every input makes channel c: ``combine`` is ``add`` or ``mul``). From this
  the channel graph ties channels, pruning carries the constant of removed channels (a PASS kind may
  scale it by an option, ``constant_scale``), and quantization places its scales: OWN and COMBINE
  outputs are requantized, the inputs of an add or a concat share one scale;
- **deployment**: whether the FPGA package has an integer form of it (``fpga``: a check returning a
  problem, or None where there is no form at all), and whether it is a detection ``head``.

Every walker asks :func:`kind_of`, so an unknown type is refused in one place, and a new kind is one
entry here (:func:`register`; the tests add a toy kind that way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.options import (
    FLOATS,
    INTS,
    POSITIVE,
    Option,
    activation_name,
    at_least,
    choice,
    flag_option,
    float_value,
    int_value,
    opt,
    probability,
    text,
)
from utils.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from models.cfg import Block, ModelCfg

OWN, PASS, CONCAT, COMBINE = "own", "pass", "concat", "combine"


@dataclass(frozen=True)
class Shape:
    c: int
    h: int
    w: int

    def __str__(self) -> str:
        return f"{self.c}x{self.h}x{self.w}"


@dataclass(frozen=True)
class Where:
    """What a shape rule may need besides its inputs: the layer's index, its inputs' indices, the cfg."""
    index: int
    sources: tuple[int, ...]
    cfg: ModelCfg


ShapeRule = Callable[["Block", list[Shape], Where], Shape]


@dataclass(frozen=True)
class LayerKind:
    name: str
    schema: dict[str, Option]
    shape: ShapeRule
    module: Callable[[Block, list[Shape]], nn.Module]
    channels: str = PASS
    combine: str = ""  # COMBINE kinds: "add" or "mul"
    constant_scale: str = ""  # PASS kinds: an option that multiplies what passes (upsample's scale)
    references: tuple[str, ...] = ()
    reads_previous: bool = True
    check: Callable[[Block], None] = lambda b: None
    written_defaults: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    fpga: Callable[[Block], str | None] | None = None
    head: bool = False

    @property
    def requantized(self) -> bool:
        """Whether an integer pipeline stores this kind's output on a scale of its own."""
        return self.channels in (OWN, COMBINE)

    @property
    def shares_input_scales(self) -> bool:
        """Whether its inputs must share one scale (an add, or a concatenation)."""
        return self.channels == CONCAT or self.combine == "add"


# ---------------------------------------------------------------------------------- helpers

def conv_padding(b: Block) -> int:
    """darknet: ``pad=1`` means size/2, otherwise ``padding=`` (default 0)."""
    return b["size"] // 2 if b["pad"] else b["padding"]


def head_channels(b: Block) -> int:
    """Channels a ``[yolo]`` block needs from its input: anchors used × (x, y, w, h, obj, classes)."""
    return len(b["mask"]) * (b["classes"] + 5)


def _needs(*keys: str) -> Callable[[Block], None]:
    def check(b: Block) -> None:
        for key in keys:
            if key not in b:
                raise UserError(f"{b.where()}: needs '{key}='")
    return check


def _layers_module(name: str, channels_in: bool = False):
    """A builder of ``models.layers.<name>`` from the block (and its input channels for a conv); the
    module is imported when first built, so reading cfgs does not import torch."""
    def build(b: Block, ins: list[Shape]) -> nn.Module:
        from models import layers

        cls = getattr(layers, name)
        return cls(b, ins[0].c) if channels_in else cls(b)
    return build


def _activation_supported(b: Block) -> str | None:
    if b["activation"] not in ("linear", "leaky", "relu"):
        return f"activation={b['activation']} has no integer form (linear, leaky, relu do)"
    return None


# ---------------------------------------------------------------------------------- shape rules

def _conv_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    x = ins[0]
    k, s, p, g = b["size"], b["stride"], conv_padding(b), b["groups"]
    if x.c % g or b["filters"] % g:
        raise UserError(f"{b.where()}: groups={g} must divide the input channels ({x.c}) and "
                        f"filters ({b['filters']})")
    return Shape(b["filters"], (x.h + 2 * p - k) // s + 1, (x.w + 2 * p - k) // s + 1)


def _maxpool_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    x = ins[0]
    k, s, p = b["size"], b["stride"], b["padding"]
    return Shape(x.c, (x.h + p - k) // s + 1, (x.w + p - k) // s + 1)


def _upsample_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    x = ins[0]
    return Shape(x.c, x.h * b["stride"], x.w * b["stride"])


def _same_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    return ins[0]


def _yolo_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    x = ins[0]
    if x.c != head_channels(b):
        feeder = w.cfg.layers[w.index - 1] if w.index else b
        raise UserError(
            f"{feeder.where()}: feeds the [yolo] head at line {b.line} with {x.c} channels, but "
            f"that head needs len(mask) * (classes + 5) = {len(b['mask'])} * ({b['classes']} + 5) "
            f"= {head_channels(b)} (set filters={head_channels(b)})")
    return x


def _route_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    x, g = ins[0], b["groups"]
    for j, s in zip(w.sources, ins):
        if (s.h, s.w) != (x.h, x.w):
            raise UserError(f"{b.where()}: cannot concatenate layer {w.sources[0]} ({x}) with layer "
                            f"{j} ({s}): spatial sizes differ")
        if s.c % g:
            raise UserError(f"{b.where()}: groups={g} does not divide the {s.c} channels of layer {j}")
    return Shape(sum(s.c // g for s in ins), x.h, x.w)


def _shortcut_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    x = ins[0]
    for j, s in zip(w.sources[1:], ins[1:]):
        if s != x:
            raise UserError(f"{b.where()}: cannot add layer {j} ({s}) to layer {w.sources[0]} ({x}): "
                            f"shapes differ")
    return x


def _scale_channels_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    x, src = ins
    if (x.c, x.h, x.w) != (src.c, 1, 1):
        raise UserError(f"{b.where()}: needs a {src.c}x1x1 input to scale layer {w.sources[1]} ({src}), "
                        f"got {x}")
    return src


def _sam_shape(b: Block, ins: list[Shape], w: Where) -> Shape:
    if ins[1] != ins[0]:
        raise UserError(f"{b.where()}: layer {w.sources[1]} ({ins[1]}) and the input ({ins[0]}) must have "
                        f"the same shape")
    return ins[0]


# ---------------------------------------------------------------------------------- checks

def _route_check(b: Block) -> None:
    _needs("layers")(b)
    if b["group_id"] >= b["groups"]:
        raise UserError(f"{b.where()}: group_id={b['group_id']} must be < groups={b['groups']}")


def _yolo_check(b: Block) -> None:
    _needs("anchors")(b)
    anchors, num = b["anchors"], b["num"]
    if len(anchors) != 2 * num:
        raise UserError(f"{b.where()}: anchors has {len(anchors)} numbers but num={num} needs {2 * num}")
    if any(a <= 0 for a in anchors):
        raise UserError(f"{b.where()}: anchors must be positive")
    bad = [m for m in b["mask"] if not 0 <= m < num]
    if bad:
        raise UserError(f"{b.where()}: mask indices {bad} are outside 0..{num - 1} (num={num})")


def _upsample_fpga(b: Block) -> str | None:
    return f"upsample scale={b['scale']} (only 1)" if b["scale"] != 1 else None


# ---------------------------------------------------------------------------------- the table

_COMBINE_SCHEMA = {"from": opt(int_value), "activation": opt(activation_name, "linear")}

KINDS: dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add a kind to the table (an existing name is an error: a kind means one thing)."""
    if kind.name in KINDS or kind.name == "net":
        raise ValueError(f"layer kind [{kind.name}] exists already")
    KINDS[kind.name] = kind
    return kind


@contextlib.contextmanager
def registered(kind: LayerKind) -> Iterator[LayerKind]:
    """``kind`` in the table for the duration of the block (tests)."""
    register(kind)
    try:
        yield kind
    finally:
        del KINDS[kind.name]


def kind_of(block_or_type: Block | str) -> LayerKind:
    """The kind of a block (or a type name); an unknown type is the one error for every walker."""
    name = block_or_type if isinstance(block_or_type, str) else block_or_type.type
    kind = KINDS.get(name)
    if kind is None:
        where = "" if isinstance(block_or_type, str) else f"{block_or_type.where()}: "
        raise UserError(f"{where}unknown section [{name}]; this project supports "
                        f"{', '.join(f'[{s}]' for s in KINDS)}")
    return kind


def canonical_name(name: str) -> str:
    """A section name with darknet's aliases resolved (``[conv]`` is ``[convolutional]``)."""
    if name in ("network", "net"):
        return "net"
    for kind in KINDS.values():
        if name in kind.aliases:
            return kind.name
    return name


register(LayerKind(
    "convolutional",
    {"filters": opt(POSITIVE, 1), "size": opt(POSITIVE, 1), "stride": opt(POSITIVE, 1),
     "pad": flag_option(0), "padding": opt(at_least(int_value, 0), 0), "groups": opt(POSITIVE, 1),
     "batch_normalize": flag_option(0),
     "activation": opt(activation_name, "logistic"),  # darknet's default, surprising as it is
     # 1: no gradient flows back through this layer; N > 1: only for the first N iterations
     "stopbackward": opt(at_least(int_value, 0), 0)},
    _conv_shape, _layers_module("ConvBN", channels_in=True), channels=OWN,
    # darknet's default activation is logistic, OpenCV's is linear: always say which
    written_defaults=("activation",),
    unsupported=("dilation", "stride_x", "stride_y", "antialiasing", "binary", "xnor", "flipped",
                 "share_index", "assisted_excitation", "coordconv", "sway", "rotate", "stretch",
                 "stretch_sway", "dot", "cbn", "deform"),
    aliases=("conv",), fpga=_activation_supported))
register(LayerKind(
    "shortcut", {"from": opt(INTS), "activation": opt(activation_name, "linear")},
    _shortcut_shape, _layers_module("Shortcut"), channels=COMBINE, combine="add", references=("from",),
    check=_needs("from"), unsupported=("weights_type", "weights_normalization"),
    fpga=_activation_supported))
register(LayerKind(
    "route", {"layers": opt(INTS), "groups": opt(POSITIVE, 1), "group_id": opt(at_least(int_value, 0), 0),
              "stopbackward": opt(at_least(int_value, 0), 0)},
    _route_shape, _layers_module("Route"), channels=CONCAT, references=("layers",),
    reads_previous=False, check=_route_check, fpga=lambda b: None))
register(LayerKind(
    "upsample", {"stride": opt(POSITIVE, 2), "scale": opt(float_value, 1.0)},
    _upsample_shape, _layers_module("Upsample"), constant_scale="scale", fpga=_upsample_fpga))
register(LayerKind(
    "maxpool", {"stride": opt(POSITIVE, 1), "size": opt(POSITIVE, lambda b: b["stride"]),
                "padding": opt(at_least(int_value, 0), lambda b: b["size"] - 1)},
    _maxpool_shape, _layers_module("MaxPool"),
    unsupported=("stride_x", "stride_y", "maxpool_depth", "out_channels", "antialiasing"),
    aliases=("max",), fpga=lambda b: None))
register(LayerKind(
    "avgpool", {}, lambda b, ins, w: Shape(ins[0].c, 1, 1), _layers_module("GlobalAvgPool"),
    aliases=("avg",)))
register(LayerKind(
    "dropout", {"probability": opt(probability, 0.5)}, _same_shape, _layers_module("Dropout"),
    unsupported=("dropblock", "dropblock_size_rel", "dropblock_size_abs")))
register(LayerKind(
    "scale_channels", dict(_COMBINE_SCHEMA), _scale_channels_shape, _layers_module("ScaleChannels"),
    channels=COMBINE, combine="mul", references=("from",), check=_needs("from"),
    unsupported=("scale_wh",)))
register(LayerKind(
    "sam", dict(_COMBINE_SCHEMA), _sam_shape, _layers_module("SAM"), channels=COMBINE, combine="mul",
    references=("from",), check=_needs("from")))
register(LayerKind(
    "yolo",
    {"mask": opt(INTS, lambda b: list(range(b["num"]))), "anchors": opt(FLOATS),
     "classes": opt(POSITIVE, 20), "num": opt(POSITIVE, 1), "scale_x_y": opt(float_value, 1.0),
     "new_coords": flag_option(0),
     # training-only keys, kept for the trainer and written back
     "jitter": opt(float_value, 0.2), "ignore_thresh": opt(float_value, 0.5),
     "truth_thresh": opt(float_value, 1.0), "iou_thresh": opt(float_value, 1.0),
     "random": opt(float_value, 0), "resize": opt(float_value, 1.0), "max_delta": opt(float_value),
     "iou_loss": opt(choice("mse", "iou", "giou", "diou", "ciou"), "mse"),
     "iou_thresh_kind": opt(choice("iou", "giou", "diou", "ciou"), "iou"),
     "iou_normalizer": opt(float_value, 0.75), "cls_normalizer": opt(float_value, 1.0),
     "obj_normalizer": opt(float_value, 1.0), "delta_normalizer": opt(float_value, 1.0),
     "nms_kind": opt(choice("default", "greedynms", "diounms", "cornersnms"), "default"),
     "beta_nms": opt(float_value, 0.6), "objectness_smooth": opt(float_value, 0),
     "label_smooth_eps": opt(float_value, 0.0), "focal_loss": flag_option(0),
     "counters_per_class": opt(text), "max": opt(POSITIVE, 200)},
    _yolo_shape, _layers_module("YoloHead"), check=_yolo_check, head=True, fpga=lambda b: None))
