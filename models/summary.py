"""Model summary: parameters (true millions), GFLOPs (2 × multiply-accumulates) and a layer table."""

from __future__ import annotations

from dataclasses import dataclass

from models.darknet import Darknet
from models.layers import conv_macs
from models.shapes import Shape, infer_shapes


@dataclass(frozen=True)
class LayerRow:
    index: int
    type: str
    inputs: tuple[int, ...]
    c_in: int
    out: Shape
    params: int
    macs: int


@dataclass(frozen=True)
class Summary:
    rows: list[LayerRow]
    params: int
    img_size: int

    @property
    def gflops(self) -> float:
        """2 × MACs / 1e9 at ``img_size`` (convolutions; pooling and additions are not counted)."""
        return 2 * sum(r.macs for r in self.rows) / 1e9

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'type':<15}{'from':<14}{'in':>6}{'out':>6}  {'output':<14}"
                 f"{'params':>11}{'GFLOPs':>9}"]
        for r in self.rows:
            src = ",".join(str(j) for j in r.inputs)
            lines.append(f"{r.index:>5}  {r.type:<15}{src:<14}{r.c_in:>6}{r.out.c:>6}  "
                         f"{f'{r.out.h}x{r.out.w}':<14}{r.params:>11,}{2 * r.macs / 1e9:>9.3f}")
        return "\n".join(lines)

    def line(self) -> str:
        return (f"{len(self.rows)} layers, {self.params / 1e6:.3f} M parameters, "
                f"{self.gflops:.3f} GFLOPs at {self.img_size}x{self.img_size}")


def summarize(model: Darknet, img_size: int | None = None) -> Summary:
    """Per-layer shapes, parameters and MACs of ``model`` for a square ``img_size`` input."""
    size = img_size or model.cfg.net["height"]
    shapes = infer_shapes(model.cfg, size, size)
    image = Shape(model.cfg.net["channels"], size, size)
    rows = []
    for i, (block, srcs, layer) in enumerate(zip(model.cfg.layers, model.inputs, model.layers)):
        c_in = (shapes[srcs[0]] if srcs[0] >= 0 else image).c
        macs = conv_macs(block, c_in, shapes[i]) if block.type == "convolutional" else 0
        params = sum(p.numel() for p in layer.parameters())
        rows.append(LayerRow(i, block.type, srcs, c_in, shapes[i], params, macs))
    return Summary(rows, sum(p.numel() for p in model.parameters()), size)
