"""Which layers feed which, and the shape of every layer's output, from the cfg alone.

This is where checks across blocks run: a ``[route]`` or ``[shortcut]`` index out of range, tensors
that cannot be concatenated or added, a ``[yolo]`` head fed the wrong number of channels. The rules
are each layer kind's (:mod:`models.kinds`); this module walks the layers with them. Each error names
the file, the line and the numbers that disagree. The model builder, the weights reader and the
summary all use these shapes, so they can never disagree with each other.
"""

from __future__ import annotations

from models.cfg import Block, ModelCfg
from models.kinds import Shape, Where, conv_padding, head_channels, kind_of
from utils.errors import UserError

IMAGE = -1  # the index that stands for the network input in ``layer_inputs``
__all__ = ["IMAGE", "Shape", "conv_padding", "head_channels", "infer_shapes", "layer_inputs", "max_stride"]


def _absolute(block: Block, i: int, ref: int, key: str) -> int:
    j = ref + i if ref < 0 else ref
    if not 0 <= j < i:
        raise UserError(f"{block.where()}: {key}={ref} points to layer {j}, but layer {i} can only "
                        f"use layers 0..{i - 1}")
    return j


def layer_inputs(cfg: ModelCfg) -> list[tuple[int, ...]]:
    """For every layer, the absolute indices of the layers it reads (``IMAGE`` for the input): the
    previous layer if its kind reads it, then the layers its reference keys name, in order."""
    inputs: list[tuple[int, ...]] = []
    for i, b in enumerate(cfg.layers):
        kind = kind_of(b)
        srcs = [i - 1] if kind.reads_previous else []  # IMAGE when i == 0
        for key in kind.references:
            refs = b[key] if isinstance(b[key], list) else [b[key]]
            srcs += [_absolute(b, i, r, key) for r in refs]
        for j in srcs:
            if j != IMAGE and kind_of(cfg.layers[j]).head:
                raise UserError(f"{b.where()}: reads the output of the [{cfg.layers[j].type}] layer {j}; "
                                f"a head is an output, not an input")
        inputs.append(tuple(srcs))
    return inputs


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
        out = kind_of(b).shape(b, ins, Where(i, srcs, cfg))
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
