"""INT8 ONNX with explicit quantization (QuantizeLinear/DequantizeLinear), the form TensorRT builds from.

The graph is the fake-quant model itself: while ``torch.onnx.export`` traces, every activation
quantizer is a Q/DQ pair with constant scales (:func:`models.quantized.quantizers.fake_quantize`) and
every quantized conv has constant folded weights and its bias on the ``s_in·s_w`` grid
(:meth:`models.quantized.modules.QConvBN.inference_params`). The exporter folds constant arithmetic, the
weights' Q/DQ included, so :func:`weight_qdq` puts a per-channel pair back in front of every quantized conv's
weights. The result follows TensorRT's rules for explicit quantization, which
:func:`tensorrt_rule_violations` checks by walking the graph:

- opset ≥ 13; int8 codes with zero point 0 everywhere (symmetric);
- weights: a per-channel Q/DQ pair on axis 0, one scale per output channel;
- activations: Q/DQ at the *input* of each quantized conv (after the producer's activation), never
  between a conv and its activation, so TensorRT fuses conv + bias + activation;
- the inputs of every Concat and residual Add carry one scale (through max-pools, resizes, slices);
- the head decode stays float.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.darknet import Darknet
from models.quantized.convert import QOutput
from models.quantized.modules import ActQuant, QConvBN
from utils.errors import CheckError, UserError
from utils.outputs import display_name

MIN_OPSET = 13
PASS_THROUGH = {"MaxPool", "Resize", "Slice", "Split", "Identity", "Reshape", "Transpose", "Pad"}
ACTIVATIONS = {"LeakyRelu", "Relu", "Sigmoid", "Mul", "Tanh", "Softplus", "HardSigmoid", "Clip"}


def int8_problems(model: Darknet) -> list[str]:
    """Why ``model`` has no TensorRT INT8 form (empty when it has one)."""
    config = model.quant_config
    if config is None:
        return ["the checkpoint is float; quantize it first (train.py --quantized google --a-symmetric, "
                "or python -m quant.ptq --a-symmetric)"]
    spec = config.spec
    problems = []
    if spec.method != "google":
        problems.append(f"its method is {spec.method}; TensorRT's int8 grid is the google method's "
                        f"(DoReFa's weights have 2^k odd levels)")
    if spec.w_bits != 8 or spec.a_bits != 8:
        problems.append(f"it has {spec.w_bits}-bit weights and {spec.a_bits}-bit activations; "
                        f"QuantizeLinear is 8-bit")
    if not spec.a_symmetric:
        problems.append("its activations are affine (uint8-style zero points); TensorRT needs symmetric "
                        "ones: quantize with --a-symmetric")
    return problems


# ---------------------------------------------------------------- the weights' Q/DQ pairs
def _conv_nodes(proto) -> dict[int, object]:
    """Layer index → the Conv node a quantized layer ``i`` traced as (``/model/layers.i/Conv``)."""
    found = {}
    for node in proto.graph.node:
        m = re.fullmatch(r"/model/layers\.(\d+)/Conv(_\d+)?", node.name)
        if node.op_type == "Conv" and m:
            found[int(m.group(1))] = node
    return found


def _constant(proto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise RuntimeError(f"{name}: not a constant of the exported graph")


def weight_qdq(model: Darknet) -> Callable:
    """A ``rewrite`` for :func:`models.onnx.export_onnx`: per-channel QuantizeLinear/DequantizeLinear on
    axis 0 in front of every quantized conv's (already quantized) float weights. A conv on a float
    input (the image, unless ``--FPGA``) keeps plain weights, already rounded to their grid:
    TensorRT runs a conv in int8 only when its input and its weights both have Q/DQ."""

    def rewrite(proto) -> None:
        from onnx import helper, numpy_helper

        convs = _conv_nodes(proto)
        for i, layer in enumerate(model.layers):
            if not isinstance(layer, QConvBN) or layer.input_quant[0] is None:
                continue  # a float input (the image, by default): TensorRT runs that conv in float
            if i not in convs:
                raise RuntimeError(f"layer {i}: no Conv node /model/layers.{i}/Conv in the exported graph")
            node = convs[i]
            w = _constant(proto, node.input[1])
            scale = layer.integer_params()[1].cpu().numpy().astype(np.float32).reshape(-1)
            codes = w / scale.reshape(-1, *([1] * (w.ndim - 1)))
            if scale.shape[0] != w.shape[0] or np.abs(codes - np.round(codes)).max(initial=0) > 1e-3:
                raise RuntimeError(f"layer {i}: the exported weights are not on their int8 grid")
            prefix = f"layers.{i}.weight_quant"
            proto.graph.initializer.extend([
                numpy_helper.from_array(scale, f"{prefix}.scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{prefix}.zero_point")])
            q, dq, qparams = f"{prefix}.q", f"{prefix}.dq", [f"{prefix}.scale", f"{prefix}.zero_point"]
            qdq = [helper.make_node("QuantizeLinear", [node.input[1], *qparams], [q], axis=0,
                                    name=f"/model/layers.{i}/weight_quant/QuantizeLinear"),
                   helper.make_node("DequantizeLinear", [q, *qparams], [dq], axis=0,
                                    name=f"/model/layers.{i}/weight_quant/DequantizeLinear")]
            at = list(proto.graph.node).index(node)
            for k, n in enumerate(qdq):
                proto.graph.node.insert(at + k, n)
            node.input[1] = dq

    return rewrite


# ---------------------------------------------------------------- TensorRT's rules
def _producers(proto) -> dict[str, object]:
    return {o: n for n in proto.graph.node for o in n.output}


def _scale_of(proto, producers: dict, tensor: str, depth: int = 0) -> np.ndarray | None:
    """The scale of the DequantizeLinear that ``tensor`` comes from, through pass-through ops and
    concats of one scale (TensorRT moves a DQ across them); None for a float tensor."""
    node = producers.get(tensor)
    if node is None or depth > 64:
        return None
    if node.op_type == "DequantizeLinear":
        return _constant(proto, node.input[1])
    if node.op_type in PASS_THROUGH:
        return _scale_of(proto, producers, node.input[0], depth + 1)
    if node.op_type == "Concat":
        scales = [_scale_of(proto, producers, t, depth + 1) for t in node.input]
        if all(s is not None and np.array_equal(s, scales[0]) for s in scales):
            return scales[0]
    return None


def tensorrt_rule_violations(proto) -> list[str]:
    """Where the Q/DQ graph breaks TensorRT's explicit-quantization rules (empty when it follows them)."""
    bad = []
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        bad.append(f"opset {opset} < {MIN_OPSET} (per-channel Q/DQ)")
    producers = _producers(proto)
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = _constant(proto, n.input[2]) if len(n.input) > 2 else None
            if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
                bad.append(f"{n.name}: zero point must be int8 0 (symmetric)")
        elif n.op_type == "Conv":
            w = producers.get(n.input[1])
            quantized = w is not None and w.op_type == "DequantizeLinear"
            if quantized:
                scale = _constant(proto, w.input[1])
                axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
                out_channels = _constant(proto, producers[w.input[0]].input[0]).shape[0]
                if axis != 0 or scale.size != out_channels:
                    bad.append(f"{n.name}: weights need per-channel scales on axis 0 ({scale.size} scales, "
                               f"axis {axis}, {out_channels} channels)")
                if _scale_of(proto, producers, n.input[0]) is None:
                    bad.append(f"{n.name}: quantized weights on an input without Q/DQ")
            for c in consumers.get(n.output[0], []):
                if c.op_type == "QuantizeLinear":
                    bad.append(f"{n.name}: Q/DQ between the conv and its activation blocks their fusion")
        elif n.op_type in ("Concat", "Add") and any(producers.get(t) is not None for t in n.input):
            scales = [_scale_of(proto, producers, t) for t in n.input]
            if n.op_type == "Add" and any(s is None for s in scales):
                continue  # an Add of the float decode
            if any(s is None for s in scales):
                if any(s is not None for s in scales):
                    bad.append(f"{n.name}: joins quantized and float tensors")
                continue
            if any(s.shape != scales[0].shape or not np.array_equal(s, scales[0]) for s in scales):
                bad.append(f"{n.name}: its inputs have different scales")
    return bad


# ---------------------------------------------------------------- onnxruntime against the fake-quant model
@dataclass
class StepReport:
    """onnxruntime vs the PyTorch fake-quant model at every quantized tensor, in quantization steps.

    The comparison is teacher-forced: each quantized layer of the PyTorch model gets onnxruntime's
    values of its inputs (its own output is compared, then replaced by onnxruntime's), so every
    difference is that layer's own, not one inherited from upstream. The detections are compared
    free-running.
    """

    tensors: int
    values: int
    max_steps: float
    off_by_one: int  # values one step apart: a rounding tie that the two runtimes' sums broke apart
    worse: int  # values more than one step apart
    worst: str  # the tensor with the largest difference
    box_px: float  # detections, free-running
    score: float

    def __str__(self) -> str:
        return (f"{self.tensors} quantized tensors, {self.values} values: max {self.max_steps:g} steps "
                f"({self.worst}), {self.off_by_one} one step apart, {self.worse} more; detections max abs "
                f"diff {self.box_px:.2e} px, {self.score:.2e} in scores")


def _quantized_outputs(model: Darknet) -> dict[str, tuple[nn.Module, ActQuant]]:
    """ONNX scope of each quantized tensor's DequantizeLinear → (module whose output it is, its quantizer)."""
    found = {}
    if model.input_quant is not None:
        found["/model/input_quant/DequantizeLinear"] = (model.input_quant, model.input_quant)
    for i, layer in enumerate(model.layers):
        if isinstance(layer, (QConvBN, QOutput)) and layer.output_quant is not None:
            found[f"/model/layers.{i}/output_quant/DequantizeLinear"] = (layer, layer.output_quant)
    return found


@torch.no_grad()
def compare_steps(path: str | Path, module: nn.Module, model: Darknet, x: torch.Tensor) -> StepReport:
    """Run ``path`` in onnxruntime with every quantized tensor as an extra output, and ``module`` (the
    exported wrapper of ``model``) in PyTorch, free-running and teacher-forced (:class:`StepReport`);
    differences are in units of each tensor's scale."""
    import onnx

    from models.onnx import ort_session

    proto = onnx.load(str(path))
    wanted = _quantized_outputs(model)
    nodes = {n.name: n for n in proto.graph.node if n.name in wanted}
    missing = sorted(set(wanted) - set(nodes))
    if missing:
        raise RuntimeError(f"{path}: no DequantizeLinear {missing[0]} for a quantized tensor")
    order = sorted(nodes)
    for name in order:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(nodes[name].output[0]))
    sess = ort_session(proto.SerializeToString())
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    ort_values = {name: torch.from_numpy(g) for name, g in zip(order, got[1:])}
    steps: dict[str, np.ndarray] = {}

    def force(name: str):
        def hook(m: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
            scale = wanted[name][1].qparams()[0].item()
            steps[name] = np.round((ort_values[name] - out).abs().numpy().ravel() / scale, 3)
            return ort_values[name]

        return hook

    ref = module(x).numpy()
    hooks = [wanted[name][0].register_forward_hook(force(name)) for name in order]
    try:
        module(x)
    finally:
        for h in hooks:
            h.remove()
    values = np.concatenate([steps[n] for n in order]) if order else np.zeros(0)
    worst = max(order, key=lambda n: steps[n].max(initial=0), default="")
    diff = np.abs(got[0] - ref).reshape(-1, ref.shape[-1])
    return StepReport(len(order), values.size, float(values.max(initial=0)), int((values == 1).sum()),
                      int((values > 1).sum()), worst, float(diff[:, :4].max(initial=0)),
                      float(diff[:, 4:].max(initial=0)))


def int8_check(model: Darknet, max_ties: float = 1e-3) -> Callable:
    """A ``check`` for :func:`models.onnx.export_onnx`: the graph follows TensorRT's rules, and, given
    the same inputs, every quantized tensor of onnxruntime is within one step of the PyTorch
    fake-quant model's, with at most ``max_ties`` of the values one step apart.

    Exact agreement is not expected with arbitrary scales: the two runtimes sum a conv in different
    orders, so a value on a rounding tie can go either way. Power-of-two scales make every product
    and sum exact in float32, and the two agree exactly. A wrong scale, zero point or placement moves
    many values of a tensor by more than a step.
    """

    def check(path: Path, module: nn.Module, x: torch.Tensor) -> None:
        import onnx

        bad = tensorrt_rule_violations(onnx.load(str(path)))
        if bad:
            raise CheckError(f"{display_name(path)}: breaks TensorRT's Q/DQ rules: " + "; ".join(bad[:3]))
        report = compare_steps(path, module, model, x)
        print(f"{display_name(path)}: onnxruntime vs PyTorch fake-quant at {tuple(x.shape)}: "
              f"{report}")
        if report.worse or report.off_by_one > max_ties * report.values:
            raise CheckError(f"{display_name(path)}: onnxruntime and the fake-quant model differ by up to "
                               f"{report.max_steps:g} steps at {report.worst} ({report.off_by_one} values "
                               f"one step apart, {report.worse} more, of {report.values})")

    return check


def export_int8_onnx(model: Darknet, path: str | Path, img_size: int | tuple[int, int], opset: int = 17,
                     dynamic: bool = False, names: list[str] | None = None, source: str = "--weights"
                     ) -> Path:
    """Write the Q/DQ ONNX of a quantized ``model``; checked by :func:`int8_check`."""
    from models.onnx import export_onnx

    problems = int8_problems(model)
    if problems:
        raise UserError(f"{source}: no INT8 ONNX for this checkpoint: " + "; ".join(problems))
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: INT8 ONNX with per-channel weights needs opset {MIN_OPSET} "
                        f"or later")
    return export_onnx(model, path, img_size, opset, dynamic, names=names, rewrite=weight_qdq(model),
                       check=int8_check(model))
