"""Inference back-ends behind one call: PyTorch (.pt, cfg + darknet weights) and ONNX (onnxruntime).

``load_detector(weights, cfg, device, half)(x)`` with x float (B, 3, H, W) RGB in [0, 1] returns the
decoded (B, N, 5 + C) detections that ``Darknet`` returns first in eval mode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.io import load_checkpoint, load_model
from utils.errors import UserError


@dataclass
class Detector:
    run: Callable[[torch.Tensor], torch.Tensor]
    names: list[str] | None  # None when the weights carry no class names
    classes: int | None  # None only for a foreign ONNX whose output width is dynamic
    stride: int  # the largest head stride: input sides must be multiples of it
    img_size: int | None  # the training/export size when known
    fixed_hw: tuple[int, int] | None  # an ONNX exported without dynamic axes takes only this (h, w)
    kind: str  # "pytorch" or "onnx"

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, N, 5 + C) float32 on the CPU."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        return self.run(x)


def load_detector(weights: str | Path, cfg: str | Path | None = None, device: torch.device | str = "cpu",
                  half: bool = False) -> Detector:
    """A ``.onnx`` runs in onnxruntime (CPU); anything else loads through ``models.io.load_model``."""
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    device = torch.device(device)
    if weights.suffix == ".onnx":
        if half:
            print("warning: --half applies to PyTorch weights on CUDA; the ONNX model runs as exported")
        return _onnx_detector(weights)
    return _torch_detector(weights, cfg, device, half)


def _torch_detector(weights: Path, cfg: str | Path | None, device: torch.device, half: bool) -> Detector:
    model = load_model(weights, cfg, device).eval().fuse()
    meta = load_checkpoint(weights)["meta"] if weights.suffix == ".pt" else {}
    if half and device.type != "cuda":
        print("warning: --half needs CUDA; running float32")
        half = False
    dtype = torch.float16 if half else torch.float32
    model.to(dtype)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device, dtype))[0].float().cpu()

    names = meta.get("names") or None
    size = meta.get("img_size") or max(model.cfg.net["height"], model.cfg.net["width"])
    return Detector(run, names, model.cfg.classes, model.max_stride, int(size), None, "pytorch")


def _onnx_detector(path: Path) -> Detector:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"--weights {path}: onnxruntime cannot load it: {e}") from None
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    if len(inp.shape) != 4 or len(out.shape) != 3:
        raise UserError(f"--weights {path}: expected an image input (B, 3, H, W) and a detections output "
                        f"(B, N, 5 + classes), found {inp.shape} and {out.shape}")
    meta = sess.get_modelmeta().custom_metadata_map
    batch, _, h, w = (d if isinstance(d, int) else None for d in inp.shape)
    fixed = (h, w) if h and w else None
    export_hw = json.loads(meta["img_size"]) if "img_size" in meta else fixed
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        chunks = [x[i:i + 1] for i in range(len(x))] if batch == 1 else [x]  # a fixed batch of one
        outs = [sess.run([out.name], {inp.name: c.cpu().numpy().astype(dtype)})[0] for c in chunks]
        return torch.from_numpy(np.concatenate(outs).astype(np.float32))

    names = json.loads(meta["names"]) if "names" in meta else None
    classes = out.shape[2] - 5 if isinstance(out.shape[2], int) else None
    return Detector(run, names or None, classes, int(meta.get("stride", 32)),
                    max(export_hw) if export_hw else None, fixed, "onnx")
