"""Which layers feed which, and the shape of every layer's output, from the cfg alone.

This is where checks across blocks live: a ``[route]`` or ``[shortcut]`` index out of range, tensors
that cannot be concatenated or added, a ``[yolo]`` head fed the wrong number of channels. Each
error names the file, the line and the numbers that disagree. The model builder, the weights reader
and the summary all use these shapes, so they can never disagree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.cfg import Block, ModelCfg
from utils.errors import UserError

IMAGE = -1  # the index that stands for the network input in ``layer_inputs``


@dataclass(frozen=True)
class Shape:
    c: int
    h: int
    w: int

    def __str__(self) -> str:
        return f"{self.c}x{self.h}x{self.w}"


def _absolute(block: Block, i: int, ref: int, key: str) -> int:
    j = ref + i if ref < 0 else ref
    if not 0 <= j < i:
        raise UserError(f"{block.where()}: {key}={ref} points to layer {j}, but layer {i} can only "
                        f"use layers 0..{i - 1}")
    return j


def layer_inputs(cfg: ModelCfg) -> list[tuple[int, ...]]:
    """For every layer, the absolute indices of the layers it reads (``IMAGE`` for the input)."""
    inputs: list[tuple[int, ...]] = []
    for i, b in enumerate(cfg.layers):
        prev = i - 1  # IMAGE when i == 0
        if b.type == "route":
            srcs = tuple(_absolute(b, i, r, "layers") for r in b["layers"])
        elif b.type == "shortcut":
            srcs = (prev, *(_absolute(b, i, r, "from") for r in b["from"]))
        elif b.type in ("scale_channels", "sam"):
            srcs = (prev, _absolute(b, i, b["from"], "from"))
        else:
            srcs = (prev,)
        for j in srcs:
            if j != IMAGE and cfg.layers[j].type == "yolo":
                raise UserError(f"{b.where()}: reads the output of the [yolo] layer {j}; "
                                f"a [yolo] layer is an output, not an input")
        inputs.append(srcs)
    return inputs


def conv_padding(b: Block) -> int:
    """darknet: ``pad=1`` means size/2, otherwise ``padding=`` (default 0)."""
    return b["size"] // 2 if b["pad"] else b["padding"]


def head_channels(b: Block) -> int:
    """Channels a ``[yolo]`` block needs from its input: anchors used × (x, y, w, h, obj, classes)."""
    return len(b["mask"]) * (b["classes"] + 5)


def _layer_shape(b: Block, ins: list[Shape], i: int, cfg: ModelCfg, srcs: tuple[int, ...]) -> Shape:
    x = ins[0]
    t = b.type
    if t == "convolutional":
        k, s, p, g = b["size"], b["stride"], conv_padding(b), b["groups"]
        if x.c % g or b["filters"] % g:
            raise UserError(f"{b.where()}: groups={g} must divide the input channels ({x.c}) and "
                            f"filters ({b['filters']})")
        return Shape(b["filters"], (x.h + 2 * p - k) // s + 1, (x.w + 2 * p - k) // s + 1)
    if t == "maxpool":
        k, s, p = b["size"], b["stride"], b["padding"]
        return Shape(x.c, (x.h + p - k) // s + 1, (x.w + p - k) // s + 1)
    if t == "upsample":
        return Shape(x.c, x.h * b["stride"], x.w * b["stride"])
    if t == "avgpool":
        return Shape(x.c, 1, 1)
    if t in ("dropout", "yolo"):
        if t == "yolo" and x.c != head_channels(b):
            feeder = cfg.layers[i - 1] if i else b
            raise UserError(
                f"{feeder.where()}: feeds the [yolo] head at line {b.line} with {x.c} channels, but "
                f"that head needs len(mask) * (classes + 5) = {len(b['mask'])} * ({b['classes']} + 5) "
                f"= {head_channels(b)} (set filters={head_channels(b)})")
        return x
    if t == "route":
        g = b["groups"]
        for j, s in zip(srcs, ins):
            if (s.h, s.w) != (x.h, x.w):
                raise UserError(f"{b.where()}: cannot concatenate layer {srcs[0]} ({x}) with layer "
                                f"{j} ({s}): spatial sizes differ")
            if s.c % g:
                raise UserError(f"{b.where()}: groups={g} does not divide the {s.c} channels of "
                                f"layer {j}")
        return Shape(sum(s.c // g for s in ins), x.h, x.w)
    if t == "shortcut":
        for j, s in zip(srcs[1:], ins[1:]):
            if s != x:
                raise UserError(f"{b.where()}: cannot add layer {j} ({s}) to layer {srcs[0]} ({x}): "
                                f"shapes differ")
        return x
    if t == "scale_channels":
        src = ins[1]
        if (x.c, x.h, x.w) != (src.c, 1, 1):
            raise UserError(f"{b.where()}: needs a {src.c}x1x1 input to scale layer {srcs[1]} "
                            f"({src}), got {x}")
        return src
    if t == "sam":
        if ins[1] != x:
            raise UserError(f"{b.where()}: layer {srcs[1]} ({ins[1]}) and the input ({x}) must have "
                            f"the same shape")
        return x
    raise AssertionError(f"no shape rule for [{t}]")  # every schema section has a rule above


def infer_shapes(cfg: ModelCfg, height: int | None = None, width: int | None = None,
                 channels: int | None = None) -> list[Shape]:
    """Output shape of every layer for an input of (channels, height, width); the cfg's by default.

    Raises UserError for any layer whose inputs do not fit together.
    """
    image = Shape(channels or cfg.net["channels"], height or cfg.net["height"],
                  width or cfg.net["width"])
    shapes: list[Shape] = []
    for i, (b, srcs) in enumerate(zip(cfg.layers, layer_inputs(cfg))):
        ins = [image if j == -1 else shapes[j] for j in srcs]
        out = _layer_shape(b, ins, i, cfg, srcs)
        if out.h < 1 or out.w < 1:
            raise UserError(f"{b.where()}: the input {image.h}x{image.w} is too small: layer {i} "
                            f"would have an empty output ({out})")
        shapes.append(out)
    return shapes


def max_stride(cfg: ModelCfg) -> int:
    """The largest downsampling factor in the network: input sizes must be multiples of it."""
    size = 4096
    shapes = infer_shapes(cfg, size, size)
    return max((size // s.h for s in shapes if s.h > 1), default=1)
