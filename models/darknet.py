"""``Darknet``: the nn.Module built from a parsed cfg."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.cfg import ModelCfg, read_cfg, write_cfg
from models.kinds import kind_of
from models.layers import ConvBN, YoloHead
from models.shapes import Shape, infer_shapes, layer_inputs, max_stride
from utils.errors import UserError


class Darknet(nn.Module):
    """A darknet network. ``layers[i]`` is darknet layer ``i``; state keys are ``layers.{i}.conv.*``.

    Train mode returns the raw head outputs, a list of (B, anchors, H, W, 5 + classes) tensors.
    Eval mode returns ``(detections, raw)``: detections is (B, N, 5 + classes) with rows
    ``cx, cy, w, h`` in input pixels, objectness, then per-class scores (all in [0, 1] except the box).
    """

    def __init__(self, cfg: ModelCfg | str | Path):
        super().__init__()
        if isinstance(cfg, (str, Path)):
            cfg = read_cfg(cfg)
        self.cfg = cfg.copy()
        shapes = infer_shapes(self.cfg)  # validates the cfg across blocks
        self.inputs = layer_inputs(self.cfg)
        net = self.cfg.net
        image = Shape(net["channels"], net["height"], net["width"])
        self.layers = nn.ModuleList(
            kind_of(block).module(block, [shapes[j] if j >= 0 else image for j in srcs])
            for block, srcs in zip(self.cfg.layers, self.inputs))
        self.heads = self.cfg.heads
        self.cfg.classes  # noqa: B018 -- raises UserError unless every head has the same class count
        self.max_stride = max_stride(self.cfg)
        # outputs a later layer reads out of order; everything else is dropped as soon as it is used
        self._keep = {j for i, srcs in enumerate(self.inputs) for j in srcs if j != i - 1}
        self.fused = False
        self.input_quant: nn.Module | None = None  # quantizes the image when quantization says so
        self.quant_config = None  # set by models.quantized.convert.quantize_model; saved in checkpoints
        self.seen = 0  # images trained on, as darknet counts them in the .weights header

    @property
    def cfg_text(self) -> str:
        return write_cfg(self.cfg)

    @property
    def yolo_heads(self) -> list[YoloHead]:
        return [self.layers[i] for i in self.heads]  # type: ignore[misc]

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        if h % self.max_stride or w % self.max_stride:
            raise UserError(f"input size {h}x{w}: height and width must be multiples of "
                            f"{self.max_stride}, the largest stride of {self.cfg.source}")
        if self.input_quant is not None:
            x = self.input_quant(x)
        image, saved, raw = x, {}, []
        for i, (layer, srcs) in enumerate(zip(self.layers, self.inputs)):
            ins = [x if j == i - 1 else (image if j < 0 else saved[j]) for j in srcs]
            if isinstance(layer, YoloHead):
                raw.append(layer(ins[0]))
                x = ins[0]
            else:
                x = layer(*ins)
            if i in self._keep:
                saved[i] = x
        if self.training:
            return raw
        heads = self.yolo_heads
        dets = torch.cat([head.decode(p, h, w) for head, p in zip(heads, raw)], 1)
        return dets, raw

    def strides(self, img_size: int | None = None) -> list[float]:
        """Each head's stride, from its feature-map size at ``img_size`` (the cfg's height by default)."""
        size = img_size or self.cfg.net["height"]
        shapes = infer_shapes(self.cfg, size, size)
        return [size / shapes[i].h for i in self.heads]

    def fuse(self) -> Darknet:
        """Fold every batch norm into its conv, for inference. Returns self."""
        for m in self.layers:
            if isinstance(m, ConvBN):
                m.fuse()
        self.fused = True
        return self

    def deploy(self) -> Darknet:
        """Ready for inference, in place: batch norms folded (:meth:`fuse`) and, for a float model,
        each conv's activation applied in place to the conv's fresh output and the weights stored
        channels-last, so oneDNN reads and writes the activations in its own layout instead of
        reordering them around every conv. Measured on a 2-core Xeon, batch 1 (``bench.speed``):
        yolo-small's CPU forward 1.24x (224 px) and 1.33x (416 px) faster, its 87 %-pruned version
        1.26x and 1.38x (docs/benchmarks.md). A quantized model is only fused. Returns self, in
        eval mode."""
        self.fuse()
        if self.quant_config is None:
            for m in self.layers:
                if isinstance(m, ConvBN) and hasattr(m.act, "inplace"):
                    m.act.inplace = True
            self.to(memory_format=torch.channels_last)
        return self.eval()
