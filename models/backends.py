"""Inference back-ends behind one call: PyTorch (.pt, cfg + darknet weights) and ONNX (onnxruntime)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.io import load_checkpoint, load_model
from utils.errors import UserError


@dataclass
class Detector:
    """``detector(x)`` with x float (B, 3, H, W) RGB in [0, 1] returns decoded (B, N, 5 + C) detections."""

    run: object
    names: list[str]
    stride: int
    img_size: int | None  # the training/export size when known
    fixed_hw: tuple[int, int] | None  # an ONNX exported without dynamic axes takes only this size
    kind: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def load_detector(weights: str | Path, cfg: str | Path | None = None, device: torch.device | str = "cpu",
                  half: bool = False) -> Detector:
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    if weights.suffix == ".onnx":
        return _onnx_detector(weights)
    device = torch.device(device)
    model = load_model(weights, cfg, device).eval()
    meta = load_checkpoint(weights)["meta"] if weights.suffix == ".pt" else {}
    dtype = torch.float16 if half and device.type == "cuda" else torch.float32
    if half and dtype != torch.float16:
        print("warning: --half needs CUDA; running float32")
    model.to(dtype)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device, dtype))[0].float()

    return Detector(run, list(meta.get("names", [])), model.max_stride, meta.get("img_size"), None, "pytorch")


def _onnx_detector(path: Path) -> Detector:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"--weights {path}: onnxruntime cannot load it: {e}") from None
    meta = sess.get_modelmeta().custom_metadata_map
    inp = sess.get_inputs()[0]
    h, w = inp.shape[2], inp.shape[3]
    fixed = (h, w) if isinstance(h, int) and isinstance(w, int) else None
    size = json.loads(meta["img_size"])[0] if "img_size" in meta else (fixed[0] if fixed else None)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = sess.run(None, {inp.name: x.cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(out)

    names = json.loads(meta.get("names", "[]"))
    return Detector(run, names, int(meta.get("stride", 32)), size, fixed, "onnx")
