"""FPGA package of a power-of-two quantized model, and the integer-only reference inference.

``write_package`` turns a ``--FPGA`` checkpoint (every layer quantized, every scale ``2^e``) into a
folder a hardware team can build from:

- ``manifest.json``: the input quantizer, then one entry per cfg layer in order: its type, the
  layers it reads, its output shape and the quantizer of its output (``exponent`` e of the scale
  ``2^e``, ``zero_point``, the code range and a ``quantizer`` id: tensors with one id share a
  scale, as the shortcut adds and route concats need); conv entries add the files, the geometry,
  the activation, the per-channel weight exponents and the requantization ``shift`` per channel;
- ``layer_NNN.weight.npy`` (int8, F×C/g×k×k codes) and ``layer_NNN.bias.npy`` (int32 codes on the
  ``2^(e_in + e_w)`` grid of the accumulator).

A conv computes, per output channel c, ``acc = Σ (q_in − z_in)·w + b`` in integers (int32 on the
device; int64 here), then for a quantized output ``q = clamp(round(acc·2^shift_c) + z_out)`` with
``shift_c = e_in + e_w,c − e_out`` (a right shift when negative, rounding half to even); leaky-ReLU
multiplies a negative ``acc`` by 13 and shifts 7 more bits. A head conv outputs ``acc`` itself with
its exponent; the ``[yolo]`` decode is float and outside the integer part. A shortcut adds
``q − z`` of its inputs (one scale by construction) and requantizes the same way. Route, max-pool
and upsample move codes without arithmetic.

``run_reference`` is that pipeline in NumPy, reading only the package: integer accumulators and
shifts, no floats between the input quantizer and the heads. It is the file to diff hardware
against, and the export checks it against the PyTorch fake-quant model code for code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.cfg import Block
from models.darknet import Darknet
from models.kinds import kind_of
from models.layers import YoloHead
from models.quantized.convert import FPGA_LEAKY, QOutput, scale_owners
from models.quantized.modules import ActQuant, QConvBN
from models.shapes import IMAGE
from utils.errors import UserError
from utils.outputs import atomic_write, save_npy

FORMAT = "yolo-compress-fpga"
VERSION = 1


def fpga_problems(model: Darknet) -> list[str]:
    """Why ``model`` has no integer package (empty when it has one): which kinds have an integer form,
    and on what condition, is the layer kind table's (``LayerKind.fpga``)."""
    config = model.quant_config
    if config is None or not config.fpga or not config.spec.pow2:
        return ["it is not a power-of-two quantized checkpoint: quantize with --FPGA (train.py --quantized "
                "google --FPGA, or python -m quant.ptq --FPGA)"]
    bad = []
    for b in model.cfg.layers:
        kind = kind_of(b)
        if kind.fpga is None:
            bad.append(f"{b.where()}: [{b.type}] has no integer form here ({', '.join(INTEGER_FORMS)} do)")
        elif (problem := kind.fpga(b)) is not None:
            bad.append(f"{b.where()}: {problem}")
    return bad


def _exponent(scale: torch.Tensor) -> list[int]:
    """e with scale == 2^e, elementwise (the scales are exact powers of two)."""
    mantissa, exp = torch.frexp(scale.detach().double().reshape(-1))
    assert bool((mantissa == 0.5).all()), "not a power of two"
    return (exp - 1).tolist()


def _quantizer_entry(q: ActQuant, ids: dict[int, int]) -> dict:
    scale, zp = q.qparams()
    return {"quantizer": ids.setdefault(id(q), len(ids)), "exponent": _exponent(scale)[0],
            "zero_point": int(zp.item()), "qmin": q.scheme.qmin, "qmax": q.scheme.qmax}


@torch.no_grad()
def write_package(model: Darknet, out: str | Path, hw: tuple[int, int]) -> dict:
    """Write the package of ``model`` into the folder ``out`` (export.py gives a temporary one, renamed
    once the package is checked); returns the manifest."""
    out = Path(out)
    problems = fpga_problems(model)
    if problems:
        raise UserError("no FPGA package for this checkpoint: " + "; ".join(problems[:3]))
    model.eval()
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, list(o.shape[1:])))
             for k, m in enumerate(model.layers)]
    try:
        model(torch.zeros(1, 3, *hw))
    finally:
        for h in hooks:
            h.remove()
    out.mkdir(parents=True, exist_ok=True)
    owner, _ = scale_owners(model)
    ids: dict[int, int] = {}

    def quant_at(j: int) -> ActQuant:  # the quantizer of layer j's output (or of the image)
        o = owner[j] if j != IMAGE else IMAGE
        return model.input_quant if o == IMAGE else model.layers[o].output_quant

    layers = []
    for i, (b, srcs) in enumerate(zip(model.cfg.layers, model.inputs)):
        form = INTEGER_FORMS[b.type]
        e = {"index": i, "type": b.type, "inputs": ["image" if j == IMAGE else j for j in srcs],
             "shape": shapes[i]}
        e |= form.entry(_Site(b, model.layers[i], i, [quant_at(j) for j in srcs], out, ids))
        if form.requantizes:
            e["output"] = _quantizer_entry(quant_at(i), ids)
        layers.append(e)
    manifest = {"format": FORMAT, "version": VERSION, "cfg": model.cfg.source,
                "input": {"shape": [3, *hw], "channels": "RGB", "values": "pixels / 255",
                          **_quantizer_entry(model.input_quant, ids)},
                "layers": layers}
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def is_package(folder: str | Path) -> bool:
    """Whether ``folder`` holds a package this module wrote (its manifest says so)."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _leaky(activation: str) -> dict:
    return {"leaky": {"multiplier": FPGA_LEAKY[0], "shift": FPGA_LEAKY[1]}} if activation == "leaky" else {}


@dataclass(frozen=True)
class _Site:
    """What a manifest entry is made from: the block, its (quantized) module, its index, the
    quantizers of its inputs, the package folder and the quantizer ids given so far."""
    block: Block
    layer: nn.Module
    index: int
    input_quants: list[ActQuant]
    out: Path
    ids: dict[int, int]


def _conv_entry(s: _Site) -> dict:
    layer, i, ids = s.layer, s.index, s.ids
    assert isinstance(layer, QConvBN)
    w_codes, s_w, b_codes = layer.integer_params()
    s_in = s.input_quants[0].qparams()[0]
    if b_codes.abs().max() >= 2 ** 31:
        raise UserError(f"layer {i}: a bias needs more than int32 at scale s_in·s_w")
    e_in, e_w = _exponent(s_in)[0], _exponent(s_w)
    names = {k: f"layer_{i:03d}.{k}.npy" for k in ("weight", "bias")}
    save_npy(s.out / names["weight"], w_codes.to(torch.int8).numpy())
    save_npy(s.out / names["bias"], b_codes.to(torch.int32).numpy())
    c = layer.conv
    act = {nn.LeakyReLU: "leaky", nn.ReLU: "relu", nn.Identity: "linear"}[type(layer.act)]
    entry = {"size": c.kernel_size[0], "stride": c.stride[0], "pad": c.padding[0], "groups": c.groups,
             "activation": act, **_leaky(act), "weights": names["weight"], "bias": names["bias"],
             "input_exponent": e_in, "weight_exponents": e_w,
             "accumulator_exponents": [e_in + k for k in e_w]}
    if layer.output_quant is None:  # a head conv: the accumulator is the output
        entry["output"] = None
    else:
        entry["output"] = _quantizer_entry(layer.output_quant, ids)
        entry["shift"] = [e_in + k - entry["output"]["exponent"] for k in e_w]
    return entry


def _shortcut_entry(s: _Site) -> dict:
    assert isinstance(s.layer, QOutput)
    act = s.block["activation"]
    return {"activation": act, **_leaky(act), "shift": _exponent(s.input_quants[0].qparams()[0])[0]
            - _exponent(s.layer.output_quant.qparams()[0])[0]}


def _yolo_entry(s: _Site) -> dict:
    head: YoloHead = s.layer
    return {"anchors": head.anchors.tolist(), "classes": head.classes, "scale_x_y": head.scale_x_y,
            "new_coords": head.new_coords, "decode": "float, outside the integer pipeline"}


# ---------------------------------------------------------------- the integer reference
def shift_round(v: np.ndarray, shift: np.ndarray | int) -> np.ndarray:
    """``v · 2^shift`` for int64 ``v``, rounded half to even when ``shift < 0`` (a right shift)."""
    v = np.asarray(v, np.int64)
    shift = np.broadcast_to(np.asarray(shift, np.int64), v.shape)
    left = np.left_shift(v, np.maximum(shift, 0))
    m = np.maximum(-shift, 0)
    q = np.right_shift(v, m)  # floor
    r = v - np.left_shift(q, m)
    half = np.where(m > 0, np.left_shift(np.int64(1), np.maximum(m - 1, 0)), 0)
    up = (m > 0) & ((r > half) | ((r == half) & (q & 1 == 1)))
    return np.where(shift >= 0, left, q + up)


def _activate(acc: np.ndarray, shift: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """The activation on the integer accumulator: (value, shift) with the value·2^shift meaning kept."""
    if activation == "relu":
        return np.maximum(acc, 0), shift
    if activation == "leaky":
        mult, extra = FPGA_LEAKY
        neg = acc < 0
        return np.where(neg, acc * mult, acc), np.where(neg, shift - extra, shift)
    return acc, shift


def _requantize(v: np.ndarray, shift: np.ndarray, out: dict) -> np.ndarray:
    return np.clip(shift_round(v, shift) + out["zero_point"], out["qmin"], out["qmax"])


def _conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int) -> np.ndarray:
    """Integer conv of (C, H, W) int64 with (F, C/g, k, k) int64 weights, zero padding."""
    f, cg, k, _ = w.shape
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    outs = []
    for g in range(groups):
        xs = windows[g * cg:(g + 1) * cg]  # (cg, H', W', k, k)
        ws = w[g * (f // groups):(g + 1) * (f // groups)]  # (f/g, cg, k, k)
        outs.append(np.tensordot(ws, xs, axes=([1, 2, 3], [0, 3, 4])))
    return np.concatenate(outs, 0)


def run_reference(package: str | Path, image: np.ndarray) -> dict[str, np.ndarray]:
    """Integer inference of one (3, H, W) image in [0, 1] from ``package`` alone.

    Returns ``"input"`` (the image codes) and, per layer ``"N"``, its output codes, or for a head conv
    its int64 accumulators (the value is ``acc · 2^accumulator_exponents[c]``).
    """
    package = Path(package)
    manifest = json.loads((package / "manifest.json").read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{package / 'manifest.json'}: not a {FORMAT} v{VERSION} manifest")
    inq = manifest["input"]
    # the input quantizer (the only float step): round(x / 2^e) + z
    codes = np.clip(np.round(np.ldexp(image.astype(np.float64), -inq["exponent"])) + inq["zero_point"],
                    inq["qmin"], inq["qmax"]).astype(np.int64)
    values: dict[str, np.ndarray] = {"input": codes}
    zero: dict = {"image": inq["zero_point"]}

    def read(j):
        return values["input" if j == "image" else str(j)]

    for e in manifest["layers"]:
        form = INTEGER_FORMS.get(e["type"])
        if form is None:
            raise UserError(f"{package / 'manifest.json'}: layer {e['index']} [{e['type']}] has no integer "
                            f"form here")
        srcs = [read(j) - zero[j] for j in e["inputs"]]  # codes minus their zero points
        values[str(e["index"])] = form.run(e, srcs, package)
        out = e.get("output")
        zero[e["index"]] = out["zero_point"] if out else 0
    return values


def _run_conv(e: dict, srcs: list[np.ndarray], package: Path) -> np.ndarray:
    w = np.load(package / e["weights"]).astype(np.int64)
    b = np.load(package / e["bias"]).astype(np.int64)
    acc = _conv(srcs[0], w, e["stride"], e["pad"], e["groups"]) + b[:, None, None]
    if e["output"] is None:  # a head conv: the accumulators are the output
        return acc
    shift = np.asarray(e["shift"], np.int64)[:, None, None]
    v, s = _activate(acc, np.broadcast_to(shift, acc.shape), e["activation"])
    return _requantize(v, s, e["output"])


def _run_shortcut(e: dict, srcs: list[np.ndarray], package: Path) -> np.ndarray:
    total = sum(srcs)
    v, s = _activate(total, np.full(total.shape, e["shift"], np.int64), e["activation"])
    return _requantize(v, s, e["output"])


def _restore_zero(e: dict, y: np.ndarray) -> np.ndarray:
    """Layers that move codes without arithmetic give back their (shared) zero point."""
    return y + e["output"]["zero_point"]


def _run_route(e: dict, srcs: list[np.ndarray], package: Path) -> np.ndarray:
    xs = [np.split(x, e["groups"], 0)[e["group_id"]] for x in srcs] if e["groups"] > 1 else srcs
    return _restore_zero(e, np.concatenate(xs, 0))


def _run_maxpool(e: dict, srcs: list[np.ndarray], package: Path) -> np.ndarray:
    before_y, after_y, before_x, after_x = e["pad"][2], e["pad"][3], e["pad"][0], e["pad"][1]
    x = np.pad(srcs[0], ((0, 0), (before_y, after_y), (before_x, after_x)),
               constant_values=np.iinfo(np.int64).min)
    k, st = e["size"], e["stride"]
    y = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::st, ::st].max((3, 4))
    return _restore_zero(e, y)


def _run_upsample(e: dict, srcs: list[np.ndarray], package: Path) -> np.ndarray:
    return _restore_zero(e, srcs[0].repeat(e["stride"], 1).repeat(e["stride"], 2))


def _run_head(e: dict, srcs: list[np.ndarray], package: Path) -> np.ndarray:
    return srcs[0]  # the float decode reads the head conv's accumulators


@dataclass(frozen=True)
class IntegerForm:
    """How the package describes one layer kind (``entry``), whether the entry carries an output
    quantizer of the layer's own (``requantizes``; a conv writes its own, a head has none), and how the
    reference computes it in integers from its inputs' codes minus their zero points (``run``)."""
    entry: Callable[[_Site], dict]
    run: Callable[[dict, list[np.ndarray], Path], np.ndarray]
    requantizes: bool = True


# one entry per layer kind whose LayerKind.fpga is set (tests/test_kinds.py holds the two together)
INTEGER_FORMS: dict[str, IntegerForm] = {
    "convolutional": IntegerForm(_conv_entry, _run_conv, requantizes=False),
    "shortcut": IntegerForm(_shortcut_entry, _run_shortcut),
    "route": IntegerForm(lambda s: {"groups": s.block["groups"], "group_id": s.block["group_id"]},
                         _run_route),
    "maxpool": IntegerForm(lambda s: {"size": s.layer.size, "stride": s.layer.stride,
                                      "pad": list(s.layer.pad)}, _run_maxpool),
    "upsample": IntegerForm(lambda s: {"stride": s.block["stride"]}, _run_upsample),
    "yolo": IntegerForm(_yolo_entry, _run_head, requantizes=False),
}


# ---------------------------------------------------------------- the check
@torch.no_grad()
def compare_with_model(package: str | Path, model: Darknet, image: np.ndarray) -> dict:
    """Run the reference and the fake-quant ``model`` on ``image``; every layer's codes (accumulators for
    head convs) must be equal. Returns counts and the largest accumulator seen."""
    manifest = json.loads((Path(package) / "manifest.json").read_text())
    ref = run_reference(package, image)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o))
             for k, m in enumerate(model.layers)]
    try:
        model.eval()(torch.from_numpy(image[None].astype(np.float32)))
    finally:
        for h in hooks:
            h.remove()
    layers, mismatched, biggest = 0, [], 0
    for e in manifest["layers"]:
        if e["type"] == "yolo":
            continue
        y = outputs[e["index"]][0].double().numpy()
        out = e.get("output")
        if out is None:  # head conv: value = acc · 2^exp
            exps = np.asarray(e["accumulator_exponents"], np.float64)[:, None, None]
            codes = np.ldexp(y, -exps.astype(np.int64))
        else:
            codes = np.ldexp(y, -out["exponent"]) + out["zero_point"]
        got = ref[str(e["index"])]
        if e["type"] == "convolutional" and out is None:
            biggest = max(biggest, int(np.abs(got).max(initial=0)))
        layers += 1
        if codes.shape != got.shape or not np.array_equal(codes, got.astype(np.float64)):
            n = int((codes != got).sum()) if codes.shape == got.shape else -1
            mismatched.append(f"layer {e['index']} [{e['type']}]: {n} values differ")
    return {"layers": layers, "mismatched": mismatched, "max_head_accumulator": biggest}
