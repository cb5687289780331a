"""INT8 ONNX with explicit quantization (QuantizeLinear/DequantizeLinear), in two layouts.

The graph is the fake-quant model itself: while ``torch.onnx.export`` traces, every activation
quantizer is a Q/DQ pair with constant scales (:func:`models.quantized.quantizers.fake_quantize`) and
every quantized conv has constant folded weights and its bias on the ``s_in·s_w`` grid
(:meth:`models.quantized.modules.QConvBN.inference_params`). The exporter folds that constant
arithmetic into float initializers, so :func:`int8_initializers` replaces each quantized conv's float
weights by their int8 codes and a per-channel DequantizeLinear (a quarter of the bytes). Which layout
the file has is the model's (``QuantConfig.target``), because the fake-quant model must compute what
the file computes:

- ``trt`` (TensorRT, :func:`tensorrt_rule_violations` checks it): opset ≥ 13; int8 codes with zero
  point 0 everywhere (symmetric); weights per channel on axis 0; activations quantized at the *input*
  of each quantized conv, never between a conv and its activation (TensorRT fuses conv + bias +
  activation); the inputs of every Concat and residual Add carry one scale; the head decode stays
  float;
- ``ort`` (onnxruntime's CPU integer kernels, :func:`float_kernels` checks what it ran): uint8
  activations with zero points and int8 per-channel weights (U8S8: the pair onnxruntime fuses on x86
  without extra session options), the bias as int32 codes on the ``s_in·s_w`` grid, a Q/DQ pair
  directly after every conv (QLinearConv) and around every activation (QLinearLeakyRelu), add
  (QLinearAdd), concat (QLinearConcat), maxpool and resize (run on uint8), so that no conv runs in
  float; the image and the heads are quantized too, the decode stays float.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.darknet import Darknet
from models.layers import MaxPool
from models.quantized.convert import QOutput
from models.quantized.modules import ActQuant, QConvBN
from utils.errors import CheckError, UserError
from utils.outputs import display_name

MIN_OPSET = 13
PASS_THROUGH = {"MaxPool", "Resize", "Slice", "Split", "Identity", "Reshape", "Transpose", "Pad"}
ACTIVATIONS = {"LeakyRelu", "Relu", "Sigmoid", "Mul", "Tanh", "Softplus", "HardSigmoid", "Clip"}


def int8_problems(model: Darknet) -> list[str]:
    """Why ``model`` has no INT8 ONNX form in its layout (empty when it has one)."""
    config = model.quant_config
    if config is None:
        return ["the checkpoint is float; quantize it first (python -m quant.ptq, or train.py --quantized "
                "google), with --int8-target trt (and --a-symmetric) or ort"]
    spec = config.spec
    problems = []
    if spec.method != "google":
        problems.append(f"its method is {spec.method}; the int8 grid is the google method's "
                        f"(DoReFa's weights have 2^k odd levels)")
    if spec.w_bits != 8 or spec.a_bits != 8:
        problems.append(f"it has {spec.w_bits}-bit weights and {spec.a_bits}-bit activations; "
                        f"QuantizeLinear is 8-bit")
    if config.target == "trt" and not spec.a_symmetric:
        problems.append("its activations are affine (uint8-style zero points); TensorRT needs symmetric "
                        "ones: quantize with --a-symmetric (or for onnxruntime with --int8-target ort)")
    if config.target == "ort" and spec.a_symmetric:
        problems.append("it is laid out for onnxruntime with symmetric activations; onnxruntime's x86 "
                        "integer kernels take uint8 ones: quantize without --a-symmetric")
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


def _initializer(proto, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper

    proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _producers(proto) -> dict[str, object]:
    return {o: n for n in proto.graph.node for o in n.output}


def _consumers(proto) -> dict[str, list]:
    """Tensor name → the nodes that read it."""
    found: dict[str, list] = {}
    for n in proto.graph.node:
        for t in n.input:
            found.setdefault(t, []).append(n)
    return found


def _drop_unused(proto) -> None:
    """Remove the nodes and initializers that nothing reads any more (replaced weights, folded pads)."""
    while True:
        used = {t for n in proto.graph.node for t in n.input} | {o.name for o in proto.graph.output}
        dead = [n for n in proto.graph.node if not any(o in used for o in n.output)]
        for n in dead:
            proto.graph.node.remove(n)
        if not dead:
            break
    keep = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _pads_into_maxpools(proto, model: Darknet) -> None:
    """Darknet's uneven maxpool padding, ``Pad(-inf) → MaxPool``, becomes one MaxPool with ``pads``:
    the same maximum, and a MaxPool directly between a DQ and a Q runs on uint8 in onnxruntime."""
    from onnx import helper

    consumers = _consumers(proto)
    for pad in [n for n in proto.graph.node if n.op_type == "Pad"]:
        m = re.fullmatch(r"/model/layers\.(\d+)/(layer/)?Pad", pad.name)
        users = consumers.get(pad.output[0], [])
        if not m or len(users) != 1 or users[0].op_type != "MaxPool":
            continue
        layer = model.layers[int(m.group(1))]
        pool = getattr(layer, "layer", layer)
        attrs = {a.name: a for a in users[0].attribute}
        padded = "auto_pad" in attrs or ("pads" in attrs and any(attrs["pads"].ints))
        if not isinstance(pool, MaxPool) or padded:
            continue
        left, right, top, bottom = pool.pad  # F.pad's order: last dimension first
        if "pads" in attrs:
            users[0].attribute.remove(attrs["pads"])
        users[0].attribute.append(helper.make_attribute("pads", [top, left, bottom, right]))
        users[0].input[0] = pad.input[0]
        proto.graph.node.remove(pad)


def int8_initializers(model: Darknet) -> Callable:
    """A ``rewrite`` for :func:`models.onnx.export_onnx`: every quantized conv's weights become int8
    codes with a per-channel DequantizeLinear on axis 0 (checked to be the exported float weights);
    in onnxruntime's layout its bias becomes int32 codes on the ``s_in·s_w`` grid with a
    DequantizeLinear too, which QLinearConv takes as its bias. A conv on a float input (the image in
    TensorRT's layout, unless ``--FPGA``) keeps plain weights, already rounded to their grid: TensorRT
    runs a conv in int8 only when its input and its weights both have Q/DQ."""
    ort = model.quant_config.target == "ort"

    def dequantized(proto, i: int, what: str, codes: np.ndarray, scale: np.ndarray, dtype) -> str:
        from onnx import helper

        prefix = f"layers.{i}.{what}_quant"
        inputs = [_initializer(proto, f"{prefix}.codes", codes.astype(dtype)),
                  _initializer(proto, f"{prefix}.scale", scale.astype(np.float32)),
                  _initializer(proto, f"{prefix}.zero_point", np.zeros(scale.shape, dtype))]
        node = helper.make_node("DequantizeLinear", inputs, [f"{prefix}.dq"], axis=0,
                                name=f"/model/layers.{i}/{what}_quant/DequantizeLinear")
        proto.graph.node.insert(0, node)
        return node.output[0]

    def rewrite(proto) -> None:
        convs = _conv_nodes(proto)
        for i, layer in enumerate(model.layers):
            if not isinstance(layer, QConvBN) or layer.input_quant[0] is None:
                continue  # a float input (the image, by default): TensorRT runs that conv in float
            if i not in convs:
                raise RuntimeError(f"layer {i}: no Conv node /model/layers.{i}/Conv in the exported graph")
            node = convs[i]
            codes, s_w, b_codes = (t.cpu().numpy() if t is not None else None for t in layer.integer_params())
            s_w = s_w.astype(np.float32).reshape(-1)
            w = _constant(proto, node.input[1])
            # the codes are the model's own (PyTorch's traced fake-quant op rounds x·(1/s), not x/s, and
            # may break a rounding tie the other way): one step apart at most, else it is another tensor
            if s_w.shape[0] != w.shape[0] or np.any(np.abs(codes * s_w.reshape(-1, 1, 1, 1) - w)
                                                    > 1.01 * s_w.reshape(-1, 1, 1, 1)):
                raise RuntimeError(f"layer {i}: the exported weights are not this conv's int8 weights")
            node.input[1] = dequantized(proto, i, "weight", codes, s_w, np.int8)
            if ort and len(node.input) > 2 and b_codes is not None:
                s_in = layer.input_quant[0].qparams()[0].cpu().numpy().astype(np.float32)
                step = (s_in * s_w).astype(np.float32)  # float32 as the model's own s_in·s_w
                b = _constant(proto, node.input[2])
                if np.abs(b_codes).max(initial=0) > np.iinfo(np.int32).max:
                    raise RuntimeError(f"layer {i}: bias codes exceed int32 (a weight scale too small)")
                if np.abs(b_codes * step - b).max(initial=0) > 1e-6 * np.abs(b).max(initial=1):
                    raise RuntimeError(f"layer {i}: the exported bias is not on its s_in*s_w grid")
                node.input[2] = dequantized(proto, i, "bias", b_codes, step, np.int32)
        if ort:
            _pads_into_maxpools(proto, model)
        _drop_unused(proto)

    return rewrite


# ---------------------------------------------------------------- TensorRT's rules


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
    consumers = _consumers(proto)
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
                out_channels = _constant(proto, w.input[0]).shape[0]
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


# ---------------------------------------------------------------- what onnxruntime ran
FLOAT_CONVS = {"Conv", "FusedConv", "NchwcConv"}  # onnxruntime's float conv kernels (after its fusions)


def ort_kernels(path: str | Path, config: dict[str, str] | None = None) -> Counter:
    """The ops onnxruntime runs for ``path`` (with session ``config``) after its graph optimisations
    (CPU), by type."""
    import onnx

    from models.onnx import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, optimized_path=optimized, config=config)
        return Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


def float_kernels(kernels: Counter) -> int:
    """How many convs of an optimized graph run in float."""
    return sum(kernels[op] for op in FLOAT_CONVS)


def kernel_summary(kernels: Counter, top: int = 8) -> str:
    """The ``top`` most frequent ops onnxruntime ran, with their counts."""
    return ", ".join(f"{op} {n}" for op, n in kernels.most_common(top))


# ---------------------------------------------------------------- onnxruntime against the fake-quant model
@dataclass
class StepReport:
    """onnxruntime vs the PyTorch fake-quant model at every quantized tensor, in quantization steps.

    The comparison is teacher-forced: each quantized tensor of the PyTorch model gets onnxruntime's
    values of its inputs (its own value is compared, then replaced by onnxruntime's), so every
    difference is that tensor's own, not one inherited from upstream. onnxruntime's values are the
    codes of the QuantizeLinear nodes, read as extra outputs of the graph onnxruntime optimized as
    usual, so in onnxruntime's layout they come from the integer kernels. The detections are
    compared free-running.
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


def _quantized_tensors(model: Darknet) -> dict[str, tuple[nn.Module, ActQuant]]:
    """ONNX scope of each quantized tensor's QuantizeLinear → (module whose output it is, its quantizer)."""
    found = {}
    if model.input_quant is not None:
        found["/model/input_quant/QuantizeLinear"] = (model.input_quant, model.input_quant)
    for i, layer in enumerate(model.layers):
        if isinstance(layer, QConvBN) and layer.preact_quant is not None:
            found[f"/model/layers.{i}/preact_quant/QuantizeLinear"] = (layer.preact_quant, layer.preact_quant)
        if isinstance(layer, (QConvBN, QOutput)) and layer.output_quant is not None:
            found[f"/model/layers.{i}/output_quant/QuantizeLinear"] = (layer, layer.output_quant)
    return found


def with_codes_as_outputs(path: str | Path, model: Darknet) -> tuple[object, dict[str, object]]:
    """The graph of ``path`` with the codes of every quantized tensor (its QuantizeLinear's output) as
    extra outputs, and those nodes by name (the names of :func:`_quantized_tensors`). onnxruntime
    still fuses it into the same integer kernels: a fused node keeps its Q's output name (tested)."""
    import onnx

    proto = onnx.load(str(path))
    wanted = _quantized_tensors(model)
    nodes = {n.name: n for n in proto.graph.node if n.name in wanted}
    missing = sorted(set(wanted) - set(nodes))
    if missing:
        raise RuntimeError(f"{path}: no QuantizeLinear {missing[0]} for a quantized tensor")
    for name in sorted(nodes):
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(nodes[name].output[0]))
    return proto, nodes


@torch.no_grad()
def compare_steps(path: str | Path, module: nn.Module, model: Darknet, x: torch.Tensor) -> StepReport:
    """Run ``path`` in onnxruntime with every quantized tensor's codes as extra outputs, and ``module``
    (the exported wrapper of ``model``) in PyTorch, free-running and teacher-forced
    (:class:`StepReport`); differences are in units of each tensor's scale."""
    from models.onnx import ort_session

    wanted = _quantized_tensors(model)
    proto, nodes = with_codes_as_outputs(path, model)
    order = sorted(nodes)
    sess = ort_session(proto.SerializeToString())
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    ort_values = {}
    for name, codes in zip(order, got[1:]):
        q = nodes[name]
        scale, zp = _constant(proto, q.input[1]), _constant(proto, q.input[2])
        ort_values[name] = torch.from_numpy((codes.astype(np.float32) - zp.astype(np.float32)) * scale)
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
    """A ``check`` for :func:`models.onnx.export_onnx`: the graph follows its runtime's rules
    (TensorRT's Q/DQ rules, or onnxruntime running no conv in float), and, given the same inputs, every
    quantized tensor of onnxruntime is within one step of the PyTorch fake-quant model's, with at
    most ``max_ties`` of the values one step apart.

    Exact agreement is not expected with arbitrary scales: the two runtimes sum a conv in different
    orders (and onnxruntime's integer kernels requantize with a float multiplier), so a value on a
    rounding tie can go either way. Power-of-two scales make every product and sum exact in float32,
    and the two agree exactly. A wrong scale, zero point or placement moves many values of a tensor by
    more than a step.
    """

    def check(path: Path, module: nn.Module, x: torch.Tensor) -> None:
        import onnx

        name = display_name(path)
        if model.quant_config.target == "trt":
            bad = tensorrt_rule_violations(onnx.load(str(path)))
            if bad:
                raise CheckError(f"{name}: breaks TensorRT's Q/DQ rules: " + "; ".join(bad[:3]))
        else:
            kernels = ort_kernels(path)
            if float_kernels(kernels):
                raise CheckError(f"{name}: onnxruntime runs {float_kernels(kernels)} conv(s) in float, not "
                                 f"as integer kernels (it ran: {kernel_summary(kernels)})")
            print(f"{name}: onnxruntime runs {kernels['QLinearConv']} QLinearConv and no float conv "
                  f"({kernel_summary(kernels)})")
        report = compare_steps(path, module, model, x)
        print(f"{name}: onnxruntime vs PyTorch fake-quant at {tuple(x.shape)}: {report}")
        if report.worse or report.off_by_one > max_ties * report.values:
            raise CheckError(f"{name}: onnxruntime and the fake-quant model differ by up to "
                             f"{report.max_steps:g} steps at {report.worst} ({report.off_by_one} values "
                             f"one step apart, {report.worse} more, of {report.values})")

    return check


def export_int8_onnx(model: Darknet, path: str | Path, img_size: int | tuple[int, int], opset: int = 17,
                     dynamic: bool = False, names: list[str] | None = None, source: str = "--weights"
                     ) -> Path:
    """Write the Q/DQ ONNX of a quantized ``model`` in its layout; checked by :func:`int8_check`."""
    from models.onnx import export_onnx

    problems = int8_problems(model)
    if problems:
        raise UserError(f"{source}: no INT8 ONNX for this checkpoint: " + "; ".join(problems))
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: INT8 ONNX with per-channel weights needs opset {MIN_OPSET} "
                        f"or later")
    return export_onnx(model, path, img_size, opset, dynamic, names=names, rewrite=int8_initializers(model),
                       check=int8_check(model))
