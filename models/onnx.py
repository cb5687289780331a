"""ONNX export of a Darknet model: one input ``images`` (B, 3, H, W) RGB in [0, 1], one output
``detections`` (B, N, 5 + C) as the PyTorch model's eval output, checked against onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.darknet import Darknet
from utils.errors import UserError


class _DetectionsOnly(nn.Module):
    def __init__(self, model: Darknet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def export_onnx(model: Darknet, path: str | Path, img_size: int | tuple[int, int], opset: int = 17,
                dynamic: bool = False, names: list[str] | None = None, atol: float = 1e-3) -> Path:
    """Write ``path``; metadata holds names, stride and image size. Returns the path.

    The exported graph is run once in onnxruntime on a random image; a difference from PyTorch above
    ``atol`` (relative to the output scale) is an error, so a wrong export never reaches the user.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if h % model.max_stride or w % model.max_stride:
        raise UserError(f"--img-size {h}x{w}: must be a multiple of {model.max_stride}")
    model = model.eval().float().cpu()
    wrapper = _DetectionsOnly(model).eval()
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "detections": {0: "batch", 1: "boxes"}}
    torch.onnx.export(wrapper, (x,), str(path), input_names=["images"], output_names=["detections"],
                      opset_version=opset, dynamic_axes=axes if dynamic else None, dynamo=False)
    proto = onnx.load(str(path))
    meta = {"names": json.dumps(names or []), "stride": str(model.max_stride), "img_size": json.dumps([h, w])}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    with torch.no_grad():
        ref = wrapper(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
    if err > atol:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {err:.2e} (relative), above {atol}")
    return path
