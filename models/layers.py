"""The torch modules behind each darknet section, with darknet's arithmetic.

Every module takes its inputs positionally in the order ``models.shapes.layer_inputs`` lists them,
so ``Darknet.forward`` is one loop with no per-type branches. Which module a section gets is the
layer kind's (:mod:`models.kinds`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.kinds import Shape, conv_padding

if TYPE_CHECKING:
    from models.cfg import Block

BN_EPS = 1e-5  # darknet (AlexeyAB) normalizes with sqrt(var + .00001f)
BN_MOMENTUM = 0.03  # running-statistics update rate in training (darknet itself uses 0.01)


class HardMish(nn.Module):
    """darknet's hard_mish: x * clamp(x + 2, 0, 2) / 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.clamp(x + 2, 0, 2) / 2


class DarknetSELU(nn.Module):
    """darknet's selu, with its rounded constants: 1.0507 * (x if x >= 0 else 1.6732 * (e^x - 1))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0507 * torch.where(x >= 0, x, 1.6732 * torch.expm1(x))


_ACTIVATIONS = {
    "linear": nn.Identity,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "mish": nn.Mish,  # x * tanh(softplus(x)), softplus threshold 20 as in darknet
    "swish": nn.SiLU,
    "logistic": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "selu": DarknetSELU,
    "gelu": lambda: nn.GELU(approximate="tanh"),  # darknet: 0.5x(1 + tanh(0.797885x + 0.035677x^3))
    "hard_mish": HardMish,
}


def activation(name: str) -> nn.Module:
    """The module for a darknet activation name (the cfg parser has checked the name)."""
    return _ACTIVATIONS[name]()


class ConvBN(nn.Module):
    """``[convolutional]``: conv, then batch norm (or a conv bias), then the activation."""

    def __init__(self, block: Block, c_in: int):
        super().__init__()
        bn = bool(block["batch_normalize"])
        self.conv = nn.Conv2d(c_in, block["filters"], block["size"], block["stride"],
                              conv_padding(block), groups=block["groups"], bias=not bn)
        self.bn: nn.Module = nn.BatchNorm2d(block["filters"], eps=BN_EPS, momentum=BN_MOMENTUM) \
            if bn else nn.Identity()
        self.act = activation(block["activation"])
        # stopbackward=1 cuts the gradient here; N > 1 (only for the first N iterations) is the
        # trainer's to apply, by setting this flag while the iteration count is below N.
        self.stop_gradient = block["stopbackward"] == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        return y.detach() if self.stop_gradient and self.training else y

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the batch norm into the conv weights and bias (inference only)."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        bn, conv = self.bn, self.conv
        # fold in float64 so the folded weights carry no extra rounding
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, groups=conv.groups, bias=True).to(conv.weight)
        fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias.double() - bn.running_mean.double() * scale)
        self.conv, self.bn = fused, nn.Identity()


class Shortcut(nn.Module):
    """``[shortcut]``: the previous output plus the ``from`` layers, then the activation."""

    def __init__(self, block: Block):
        super().__init__()
        self.act = activation(block["activation"])

    def forward(self, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        for o in others:
            x = x + o
        return self.act(x)


class Route(nn.Module):
    """``[route]``: concatenate the listed layers; with ``groups`` take slice ``group_id`` of each."""

    def __init__(self, block: Block):
        super().__init__()
        self.groups, self.group_id = block["groups"], block["group_id"]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.groups > 1:
            xs = tuple(x.chunk(self.groups, dim=1)[self.group_id] for x in xs)
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


class Upsample(nn.Module):
    """``[upsample]``: nearest-neighbour by ``stride``, times ``scale``."""

    def __init__(self, block: Block):
        super().__init__()
        self.stride, self.scale = block["stride"], block["scale"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return y * self.scale if self.scale != 1 else y


class MaxPool(nn.Module):
    """``[maxpool]`` as darknet pools: ``padding`` (default size-1) split padding//2 before, rest after.

    Even padding of at most half the window (SPP's 5, 9 and 13 at stride 1) is the pool's own
    padding, which ignores the border as the -inf pad does: one op instead of two, and in the float
    ONNX a MaxPool with ``pads`` that onnxruntime keeps in its blocked layout, where a Pad needed two
    layout reorders around it (5 fewer nodes in yolo-small's optimized graph; no latency change
    beyond the noise, measured). Other paddings (yolov3-tiny's 2x2 at stride 1 pads one side) are an
    explicit -inf pad first."""

    def __init__(self, block: Block):
        super().__init__()
        self.size, self.stride, p = block["size"], block["stride"], block["padding"]
        self.pad = (p // 2, p - p // 2, p // 2, p - p // 2)  # darknet's: left, right, top, bottom
        self.own_pad = p // 2 if p % 2 == 0 and p // 2 <= self.size // 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_pad is not None:
            return F.max_pool2d(x, self.size, self.stride, self.own_pad)
        return F.max_pool2d(F.pad(x, self.pad, value=float("-inf")), self.size, self.stride)


class GlobalAvgPool(nn.Module):
    """``[avgpool]``: darknet's avgpool averages each channel over the whole map."""

    def __init__(self, block: Block | None = None):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class Dropout(nn.Dropout):
    """``[dropout]``: drops with ``probability`` while training, the identity in eval."""

    def __init__(self, block: Block):
        super().__init__(block["probability"])


class ScaleChannels(nn.Module):
    """``[scale_channels]``: layer ``from`` times the per-channel (Cx1x1) previous output."""

    def __init__(self, block: Block):
        super().__init__()
        self.act = activation(block["activation"])

    def forward(self, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.act(x * scales)


class SAM(ScaleChannels):
    """``[sam]``: layer ``from`` times the previous output, element by element."""


class YoloHead(nn.Module):
    """``[yolo]``: reshapes its input to (B, anchors, H, W, 5 + classes) and decodes boxes.

    ``forward`` returns the raw map (what the loss needs); ``decode`` turns it into boxes in input
    pixels (cx, cy, w, h), objectness and per-class scores, exactly as darknet's yolo layer does,
    with ``scale_x_y`` and ``new_coords``. Strides come from the input and feature-map sizes.
    """

    def __init__(self, block: Block):
        super().__init__()
        anchors = torch.tensor(block["anchors"], dtype=torch.float32).view(-1, 2)[block["mask"]]
        self.register_buffer("anchors", anchors, persistent=False)  # pixels, from the cfg
        self.classes = block["classes"]
        self.scale_x_y = float(block["scale_x_y"])
        self.new_coords = bool(block["new_coords"])

    @property
    def na(self) -> int:
        return self.anchors.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, ny, nx = x.shape
        return x.view(b, self.na, self.classes + 5, ny, nx).permute(0, 1, 3, 4, 2).contiguous()

    def decode(self, p: torch.Tensor, img_h: int, img_w: int) -> torch.Tensor:
        """(B, na, ny, nx, 5 + C) raw → (B, na*ny*nx, 5 + C) decoded, rows in (anchor, gy, gx) order."""
        b, na, ny, nx, no = p.shape
        gy, gx = torch.meshgrid(torch.arange(ny, device=p.device, dtype=p.dtype),
                                torch.arange(nx, device=p.device, dtype=p.dtype), indexing="ij")
        grid = torch.stack((gx, gy), -1)  # (ny, nx, 2)
        stride = torch.tensor([img_w / nx, img_h / ny], device=p.device, dtype=p.dtype)
        anchors = self.anchors.to(p.dtype).view(1, na, 1, 1, 2)
        s = self.scale_x_y
        if self.new_coords:  # the conv before the head already applied the logistic
            xy, wh, rest = p[..., :2], 4 * p[..., 2:4] ** 2, p[..., 4:]
        else:
            xy, wh, rest = p[..., :2].sigmoid(), p[..., 2:4].exp(), p[..., 4:].sigmoid()
        # (xy·s − (s − 1)/2 + grid)·stride as one multiply and one add: the offset depends on the
        # map's size alone, so onnxruntime folds it into a constant and the graph runs two ops
        xy = xy * (stride * s) + (grid - 0.5 * (s - 1)) * stride
        return torch.cat((xy, wh * anchors, rest), -1).view(b, -1, no)


def conv_macs(block: Block, c_in: int, out: Shape) -> int:
    """Multiply-accumulates of a ``[convolutional]`` layer for one image."""
    return out.h * out.w * out.c * (c_in // block["groups"]) * block["size"] ** 2

