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

from models.io import open_checkpoint, resolve_img_size
from utils.errors import UserError

FOREIGN_ONNX_SIZE = 416


@dataclass
class Detector:
    run: Callable[[torch.Tensor], torch.Tensor]
    names: list[str] | None  # None when the weights carry no class names
    classes: int | None  # None only for a foreign ONNX whose output width is dynamic
    stride: int  # the largest head stride: input sides must be multiples of it
    img_size: int  # the size to run at unless told: the checkpoint's or export's, else the cfg's
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
    opened = open_checkpoint(weights, cfg, device)
    model = opened.model.deploy()
    if half and device.type != "cuda":
        print("warning: --half needs CUDA; running float32")
        half = False
    dtype = torch.float16 if half else torch.float32
    model.to(dtype)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device, dtype))[0].float().cpu()

    size = resolve_img_size(None, opened.img_size, model)  # the checkpoint's size, else the cfg's
    return Detector(run, opened.names, model.cfg.classes, model.max_stride, size, None, "pytorch")


def _onnx_detector(path: Path) -> Detector:
    from models.onnx import ort_session

    sess = ort_session(path)
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
    # an ONNX without this project's metadata and with a dynamic size: darknet's usual 416
    return Detector(run, names or None, classes, int(meta.get("stride", 32)),
                    max(export_hw) if export_hw else FOREIGN_ONNX_SIZE, fixed, "onnx")
