"""The export stage (``export.py``): a trained model in the formats deployment needs, each checked
before it is kept.

    python export.py --weights runs/train/exp/weights/best.pt --include onnx weights
    python export.py --weights runs/train/qat/weights/last.pt --include onnx-int8 engine
    python export.py --cfg cfg/yolov3-tiny.cfg --weights yolov3-tiny.weights --include onnx --img-size 416

- ``onnx``: float ONNX (batch norms folded, decode in the graph), checked against PyTorch in
  onnxruntime; ``--dynamic`` for any batch and image size.
- ``onnx-int8``: QuantizeLinear/DequantizeLinear ONNX of an 8-bit QAT or PTQ checkpoint with int8
  weights, in the layout the checkpoint was quantized for (``--int8-target``): TensorRT's (symmetric
  activations, ``--a-symmetric``) or onnxruntime's CPU integer kernels (``quant/qdq.py``); checked
  against the runtime's rules and against the PyTorch fake-quant model in onnxruntime, step by step.
- ``engine``: a TensorRT engine from that ONNX (INT8 for a quantized checkpoint, else FP16 with
  ``--half`` or FP32), when ``tensorrt`` is importable; otherwise the ``trtexec`` command to run on
  the Jetson.
- ``weights``: darknet ``.cfg`` + ``.weights`` of a float checkpoint (pruned ones included), checked
  by reading them back.
- ``fpga``: a folder of int8 weights, int32 biases, shifts and a JSON manifest of a power-of-two
  (``--FPGA``) checkpoint (``quant/fpga.py``), checked by running the integer-only reference
  inference against the fake-quant model.

Outputs go beside the weights (``best.pt`` -> ``best.onnx``, ``best.int8.onnx``, ``best.cfg`` ...) unless
``--output`` gives another stem. Every destination is checked before the first is written: an input
(``--weights``, ``--cfg``) is never written over, an existing file only with ``--exist-ok``; each file
appears only once its check passed.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.darknet import Darknet
from models.io import load_model, open_checkpoint
from utils.cli import BATCH, IMG_SIZE, OPSET, from_namespace, option, options_parser, values_from_mapping
from utils.errors import CheckError, UserError
from utils.outputs import OutputPlan, atomic_path, atomic_write
from utils.results import StageResult

FORMATS = ("onnx", "onnx-int8", "engine", "weights", "fpga")


@dataclass
class ExportOptions:
    """The flags of ``export.py``."""
    weights: str = option("", "--weights", required=True,
                          help=".pt checkpoint, or darknet weights with --cfg")
    cfg: str = option("", "--cfg", help="darknet cfg (needed with darknet weights)")
    include: list[str] = option(None, "--include", nargs="+", choices=FORMATS, factory=lambda: ["onnx"],
                                help="formats to write")
    img_size: list[int] | None = option(None, "--img-size", type=IMG_SIZE, nargs="+",
                                        help="h [w]; default: the checkpoint's training size, else the cfg's "
                                             "[net] size")
    batch_size: int = option(1, "--batch-size", type=BATCH, help="engine: the batch it is built for")
    dynamic: bool = option(False, "--dynamic", help="ONNX: dynamic batch, height and width")
    simplify: bool = option(False, "--simplify", help="ONNX: onnxruntime's basic graph optimisations")
    raw: bool = option(False, "--raw", help="onnx: output the undecoded heads (head0, head1...: B x anchors "
                                            "x H x W x (5 + classes) logits) instead of the decoded "
                                            "detections")
    half: bool = option(False, "--half", help="engine: FP16 (a float checkpoint)")
    opset: int = option(17, "--opset", type=OPSET)
    output: str = option("", "--output", help="output stem (default: the weights' path without suffix)")
    exist_ok: bool = option(False, "--exist-ok",
                            help="replace outputs that exist (an FPGA package folder only if this program "
                                 "wrote it)")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    return options_parser("export.py", description or __doc__, ExportOptions)


def parse(argv: list[str] | None = None, description: str = "") -> ExportOptions:
    return from_namespace(ExportOptions, build_parser(description).parse_args(argv))


def from_mapping(mapping: Mapping[str, Any], where: str) -> ExportOptions:
    """A recipe stage's options, each checked as its flag is."""
    return ExportOptions(**values_from_mapping([ExportOptions], mapping, where, "export.py")[ExportOptions])


@dataclass
class Job:
    model: Darknet
    hw: tuple[int, int]
    stem: Path
    names: list[str] | None
    args: ExportOptions

    @property
    def quantized(self) -> bool:
        return self.model.quant_config is not None

    def path(self, suffix: str) -> Path:
        """The output stem with ``suffix`` appended (a dot in the stem's name is kept)."""
        return self.stem.with_name(self.stem.name + suffix)


def _report(path: Path, what: str) -> Path:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {path} ({size / 1e6:.2f} MB): {what}")
    return path


def export_onnx_float(job: Job) -> list[Path]:
    if job.quantized:
        raise UserError(f"--weights {job.args.weights}: a quantized checkpoint; export it with "
                        f"--include onnx-int8 (or export its float parent with onnx)")
    from models.onnx import export_onnx

    a = job.args
    out = export_onnx(job.model.fuse(), job.path(".onnx"), job.hw, a.opset, a.dynamic, a.simplify,
                      job.names, raw=a.raw)
    what = "raw heads" if a.raw else "detections"
    return [_report(out, f"float ONNX ({what}) at {job.hw[0]}x{job.hw[1]}{', dynamic' if a.dynamic else ''}, "
                         f"matches PyTorch in onnxruntime")]


def export_onnx_int8(job: Job) -> list[Path]:
    from quant.qdq import export_int8_onnx

    a = job.args
    out = export_int8_onnx(job.model, job.path(".int8.onnx"), job.hw, a.opset, a.dynamic, job.names,
                           source=f"--weights {a.weights}")
    layout = {"trt": "TensorRT's layout, its rules checked",
              "ort": "onnxruntime's layout, every conv an integer kernel"}[job.model.quant_config.target]
    return [_report(out, f"Q/DQ ONNX in {layout}, onnxruntime matches the fake-quant model")]


def export_engine(job: Job) -> list[Path]:
    from deploy.tensorrt import build_engine

    if job.quantized and job.model.quant_config.target != "trt":
        raise UserError(f"--weights {job.args.weights}: laid out for onnxruntime (--int8-target ort, uint8 "
                        f"activations), which TensorRT cannot build; quantize for it with --int8-target trt "
                        f"--a-symmetric")

    onnx_path = (export_onnx_int8 if job.quantized else export_onnx_float)(job)[0]
    precision = "int8" if job.quantized else "fp16" if job.args.half else "fp32"
    out = build_engine(onnx_path, job.path(".engine"), precision, job.args.batch_size, job.hw)
    return [onnx_path, _report(out, f"TensorRT {precision} engine")]


def export_darknet(job: Job) -> list[Path]:
    if job.quantized:
        raise UserError(f"--weights {job.args.weights}: a quantized checkpoint has no darknet form; export "
                        f"its float parent with --include weights")
    from models.io import save_darknet_weights

    cfg, weights = job.path(".cfg"), job.path(".weights")
    atomic_write(cfg, job.model.cfg_text)
    save_darknet_weights(job.model, weights)
    diff = _reload_diff(job.model, cfg, weights, job.hw)
    if diff > 1e-5:
        raise CheckError(f"{weights}: read back with {cfg}, it differs from the checkpoint by {diff:.2e}")
    return [_report(cfg, "darknet cfg"),
            _report(weights, f"darknet weights, read back with the cfg: max abs diff {diff:.1e}")]


def _reload_diff(model: Darknet, cfg: Path, weights: Path, hw: tuple[int, int]) -> float:
    import torch

    back = load_model(weights, cfg).eval()
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((back(x)[0] - model.eval()(x)[0]).abs().max())


def export_fpga(job: Job) -> list[Path]:
    import numpy as np

    from quant.fpga import compare_with_model, write_package

    out = job.path("_fpga")
    with atomic_path(out, folder=True) as tmp:  # the folder appears only once its check passed
        write_package(job.model, tmp, job.hw)
        image = np.random.default_rng(0).random((3, *job.hw), dtype=np.float32)
        result = compare_with_model(tmp, job.model, image)
        if result["mismatched"]:
            raise CheckError(f"{out}: the integer reference differs from the fake-quant model: "
                             + "; ".join(result["mismatched"][:3]))
    return [_report(out, f"FPGA package; the integer reference (quant/fpga.py) equals the fake-quant model "
                         f"code for code at {result['layers']} layers")]


WRITERS = {"onnx": export_onnx_float, "onnx-int8": export_onnx_int8, "engine": export_engine,
           "weights": export_darknet, "fpga": export_fpga}


def destinations(fmt: str, quantized: bool) -> list[str]:
    """The suffixes (appended to the output stem) that format ``fmt`` writes."""
    onnx = ".int8.onnx" if quantized else ".onnx"
    return {"onnx": [".onnx"], "onnx-int8": [".int8.onnx"], "engine": [onnx, ".engine"],
            "weights": [".cfg", ".weights"], "fpga": ["_fpga"]}[fmt]


def run(a: ExportOptions) -> StageResult:
    """Write every format of ``a.include`` (all destinations checked first); the outputs are the files."""
    if a.img_size is not None and len(a.img_size) > 2:
        raise UserError(f"--img-size {' '.join(map(str, a.img_size))}: give one size, or height and width")
    if a.raw and a.include != ["onnx"]:
        raise UserError(f"--raw: applies to --include onnx alone (the other formats keep the decode), not "
                        f"{' '.join(a.include)}")
    opened = open_checkpoint(a.weights, a.cfg or None)
    weights, meta = opened.path, opened.meta
    # the size precedence of every script: --img-size, the checkpoint's size, the cfg's [net] size
    net = opened.model.cfg.net
    hw = ((a.img_size[0], a.img_size[-1]) if a.img_size else (opened.img_size, opened.img_size)
          if opened.img_size else (net["height"], net["width"]))
    stem = Path(a.output) if a.output else weights.with_suffix("")
    written = []
    order = [f for f in FORMATS if f in a.include]
    if "engine" in order:  # the engine writes its ONNX itself
        order = [f for f in order if f != ("onnx-int8" if meta.get("quant") else "onnx")]
    from quant.fpga import is_package

    plan = OutputPlan([weights, a.cfg], a.exist_ok, replaceable=is_package)
    for fmt in order:
        for suffix in destinations(fmt, bool(meta.get("quant"))):
            plan.add(stem.with_name(stem.name + suffix), f"--include {fmt}")
    plan.check()  # before the first file: a refused export writes nothing
    for k, fmt in enumerate(order):
        model = opened.model if k == 0 else load_model(weights, a.cfg or None)  # onnx fuses its model
        written += WRITERS[fmt](Job(model.eval(), hw, stem, opened.names, a))
    return StageResult(None, written, written)
