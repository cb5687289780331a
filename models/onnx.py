"""ONNX export of a Darknet model: one input ``images`` (B, 3, H, W) RGB in [0, 1], one output
``detections`` (B, N, 5 + C) as the PyTorch model's eval output, checked against onnxruntime.

The TorchScript exporter (``dynamo=False``) is used: it honours the requested opset, writes the same
bytes for the same model and takes a fraction of a second; the dynamo exporter took 4-6 s here and
cannot write opset 17. Its trace warnings about the decode's stride constant are expected (the stride
of a head is the same at every valid input size) and the dynamic export is checked at a second size.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from models.darknet import Darknet
from utils.errors import CheckError, UserError
from utils.outputs import atomic_path, display_name

if TYPE_CHECKING:
    import onnx


class DetectionsOnly(nn.Module):
    """A Darknet in eval mode that returns only its decoded detections."""

    def __init__(self, model: Darknet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


class RawHeads(nn.Module):
    """A Darknet in eval mode that returns its heads undecoded: per ``[yolo]`` layer the logits as
    (B, anchors, H, W, 5 + C), x, y, w, h, objectness and classes before any sigmoid or exp."""

    def __init__(self, model: Darknet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x)[1])


Check = Callable[[Path, nn.Module, torch.Tensor], None]


def ort_session(model: str | Path | bytes, optimize: str | None = None, optimized_path: Path | None = None,
                config: dict[str, str] | None = None, profile_prefix: Path | None = None,
                spinning: bool = False):
    """The one way the suite opens an onnxruntime session (CPU), with denormals flushed to zero.
    Its idle threads do not spin unless ``spinning`` (onnxruntime's own default, what a deployed
    session runs with): a spinning session slows whatever else runs meanwhile (measured 3-6x on
    PyTorch timed after it, 1.8x on another session), so only :func:`models.summary.ort_latencies`,
    which keeps one session alive at a time, asks for it. ``optimize`` ("basic") with
    ``optimized_path`` writes the optimized graph there; ``config`` adds session config entries;
    ``profile_prefix`` turns on onnxruntime's profiler (its JSON is written there on
    ``end_profiling()``). A model onnxruntime cannot load is a UserError."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if optimize == "basic":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        name = "the model" if isinstance(model, bytes) else model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{name}: onnxruntime cannot load it: {first}") from None


def export_onnx(model: Darknet, path: str | Path, img_size: int | tuple[int, int], opset: int = 17,
                dynamic: bool = False, simplify: bool = False, names: list[str] | None = None,
                atol: float = 1e-4, rewrite: Callable[[onnx.ModelProto], None] | None = None,
                check: Check | None = None, raw: bool = False) -> Path:
    """Write ``path`` (batch, height and width dynamic with ``dynamic``) and return it.

    Metadata props: ``names`` (JSON list), ``stride``, ``img_size`` (JSON [h, w]). ``simplify`` applies
    onnxruntime's basic graph optimisations (constant folding, redundant-node removal; standard ops
    only). ``rewrite`` edits the graph in place before it is checked (the INT8 export adds its weight
    quantizers there). The file is checked with ``onnx.checker`` and run in onnxruntime on a fixed
    random image (and at a second size when dynamic) by ``check``; the default compares with PyTorch,
    and a difference above ``atol`` in a score, or in a box coordinate relative to the larger of the
    input size and the coordinate itself (:func:`compare_onnx`), is a CheckError. A failed check
    leaves no file behind. The model is put in eval mode, float32,
    on the CPU. ``raw`` exports the undecoded heads (:class:`RawHeads`, outputs ``head0``, ``head1``...)
    instead of the detections, for decoders of one's own; they are checked to ``atol`` of their scale.
    """
    import onnx

    path = Path(path)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    s = model.max_stride
    if h % s or w % s:
        raise UserError(f"--img-size {h}x{w}: height and width must be multiples of {s}")
    model = model.eval().float().cpu()
    wrapper = (RawHeads(model) if raw else DetectionsOnly(model)).eval()
    outputs = [f"head{k}" for k in range(len(model.heads))] if raw else ["detections"]
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as part:  # renamed to ``path`` only once every check passed
        _write(wrapper, x, part, opset, dynamic, simplify, outputs)
        proto = onnx.load(str(part))
        width = proto.graph.output[0].type.tensor_type.shape.dim[-1]
        if not width.dim_value:  # the exporter can lose it behind Q/DQ nodes; readers need the class count
            width.dim_value = 5 + model.yolo_heads[0].classes
        if rewrite is not None:
            rewrite(proto)
        meta = {"names": json.dumps(names or []), "stride": str(s), "img_size": json.dumps([h, w])}
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(part))  # into a temporary (atomic_path)
        inputs = [x]
        if dynamic:  # a trace can bake one size's shapes in; a second batch and size would show it
            inputs.append(torch.rand(2, 3, h + s, w + 2 * s, generator=torch.Generator().manual_seed(1)))
        for xi in inputs:
            (check or (_raw_check if raw else _float_check)(atol))(part, wrapper, xi)
    return path


def _write(module: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool, simplify: bool,
           outputs: list[str]) -> None:
    axes = {"images": {0: "batch", 2: "height", 3: "width"}}
    for name in outputs:
        axes[name] = {0: "batch", 1: "boxes"} if name == "detections" else {0: "batch", 2: f"{name}_h",
                                                                             3: f"{name}_w"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for message in ("You are using the legacy TorchScript", "The feature will be removed"):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        # into a temporary: export_onnx passes its atomic_path
        torch.onnx.export(module, (x,), str(path), input_names=["images"], output_names=outputs,
                          opset_version=opset, dynamic_axes=axes if dynamic else None, dynamo=False)
    if simplify:
        _simplify(path)


def _raw_check(atol: float) -> Check:
    def check(path: Path, module: nn.Module, x: torch.Tensor) -> None:
        sess = ort_session(path)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            ref = [r.numpy() for r in module(x)]
        worst = max(float(np.abs(g - r).max() / max(1.0, np.abs(r).max())) for g, r in zip(got, ref))
        print(f"{display_name(path)}: onnxruntime vs PyTorch at {tuple(x.shape)}: raw heads "
              f"max diff {worst:.2e} of their scale")
        if len(got) != len(ref) or worst > atol:
            raise CheckError(f"{display_name(path)}: onnxruntime's raw heads differ from PyTorch's by "
                             f"{worst:.2e} at input {tuple(x.shape)}, above {atol}")

    return check


def _float_check(atol: float) -> Check:
    def check(path: Path, module: nn.Module, x: torch.Tensor) -> None:
        d = compare_onnx(path, module, x)
        print(f"{display_name(path)}: onnxruntime vs PyTorch at {tuple(x.shape)}: max abs diff "
              f"{d.box_px:.2e} px in boxes ({d.box_rel:.1e} relative), {d.score:.2e} in scores")
        if d.box_rel > atol or d.score > atol:
            raise CheckError(f"{display_name(path)}: onnxruntime differs from PyTorch at input "
                             f"{tuple(x.shape)} by {d.box_rel:.2e} in boxes (relative) or {d.score:.2e} in "
                             f"scores, above {atol}")

    return check


@dataclass(frozen=True)
class OnnxDiff:
    """How far onnxruntime's detections are from PyTorch's: the largest box difference in pixels and
    relative to max(input size, |box value|), and the largest objectness or class score difference."""

    box_px: float
    box_rel: float
    score: float


@torch.no_grad()
def compare_onnx(path: str | Path, module: nn.Module, x: torch.Tensor) -> OnnxDiff:
    """Compare onnxruntime with ``module`` on ``x``. Boxes are compared relative to their size: a
    barely trained model decodes boxes of exp(t)·anchor with t of 10 or more, and float32 agrees to
    about 1e-6 of any magnitude, not to a fixed number of pixels. Equal infinities are equal."""
    sess = ort_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].astype(np.float64)
    ref = module(x).numpy().astype(np.float64)
    if got.shape != ref.shape:
        raise CheckError(f"{display_name(path)}: onnxruntime output {got.shape} != PyTorch {ref.shape}")
    same = (got == ref) | (np.isnan(got) & np.isnan(ref))  # also equal infinities
    diff = np.where(same, 0.0, np.abs(got - ref)).reshape(-1, ref.shape[-1])
    boxes = np.abs(ref).reshape(-1, ref.shape[-1])[:, :4]
    rel = diff[:, :4] / np.maximum(max(x.shape[2:]), np.where(np.isfinite(boxes), boxes, 0))
    return OnnxDiff(float(diff[:, :4].max(initial=0)), float(rel.max(initial=0)),
                    float(diff[:, 4:].max(initial=0)))


def _simplify(path: Path) -> None:
    """Rewrite ``path`` with onnxruntime's basic (hardware-independent) optimisations applied."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "simplified.onnx"
        ort_session(path, optimize="basic", optimized_path=optimized)
        proto = onnx.load(str(optimized))
    used = {n.domain for n in proto.graph.node} | {""}
    kept = [o for o in proto.opset_import if o.domain in used]  # onnxruntime lists every domain it knows
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    onnx.save(proto, str(path))  # into a temporary: export_onnx passes its atomic_path
