"""export.py: float ONNX, INT8 Q/DQ ONNX, darknet weights and the engine path, each against a real runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
from models.darknet import Darknet
from models.io import save_checkpoint
from models.onnx import DetectionsOnly
from models.quantized.convert import QuantConfig, quantize_model
from models.quantized.modules import QConvBN, QuantSpec
from quant.qdq import (
    compare_steps,
    float_kernels,
    int8_check,
    ort_kernels,
    tensorrt_rule_violations,
    with_codes_as_outputs,
)
from tests.conftest import REPO, rel_err, tame_model
from tests.test_opencv_parity import assert_matches_opencv
from tests.test_prune import method_prune, spread_gammas
from utils.cli import run_cli
from utils.errors import CheckError

SIZE = 64


def _pruned() -> Darknet:
    return method_prune(spread_gammas(tame_model(REPO / "cfg" / "yolo-small.cfg")), "normal", None, 0.4)


MODELS = {
    "yolo-small": lambda: tame_model(REPO / "cfg" / "yolo-small.cfg"),
    "yolov3-tiny": lambda: tame_model(REPO / "cfg" / "yolov3-tiny.cfg"),
    "yolov4-tiny": lambda: tame_model(REPO / "cfg" / "yolov4-tiny.cfg"),
    "pruned yolo-small": _pruned,
}


def _pt(model: Darknet, path) -> str:
    save_checkpoint(path, model, img_size=SIZE)
    return str(path)


def _onnx_out(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x.numpy()})[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_float_onnx_matches_pytorch(name, tmp_path):
    model = MODELS[name]().eval()
    out = export.main(["--weights", _pt(model, tmp_path / "m.pt"), "--include", "onnx"])
    assert out == [tmp_path / "m.onnx"]
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)[0].numpy()
    assert rel_err(_onnx_out(out[0], x), ref) < 1e-4


def test_raw_heads_onnx_matches_pytorch_at_a_second_size(tmp_path):
    model = MODELS["yolov4-tiny"]().eval()
    pt = _pt(model, tmp_path / "m.pt")
    out = export.main(["--weights", pt, "--include", "onnx", "--raw", "--dynamic"])[0]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["head0", "head1"]
    x = torch.rand(2, 3, SIZE + 32, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)[1]
    got = sess.run(None, {"images": x.numpy()})
    assert [g.shape for g in got] == [tuple(r.shape) for r in ref]  # (B, anchors, H, W, 5 + C)
    assert max(rel_err(g, r.numpy()) for g, r in zip(got, ref)) < 1e-4


def _quantized(name: str, fpga: bool, target: str = "trt") -> Darknet:
    torch.manual_seed(0)
    model = tame_model(REPO / "cfg" / f"{name}.cfg")
    spec = QuantSpec(a_symmetric=target == "trt", pow2=fpga)
    quantize_model(model, QuantConfig(spec, fpga=fpga, target=target))
    model.train()
    with torch.no_grad():
        for _ in range(2):  # the activation ranges
            model(torch.rand(2, 3, SIZE, SIZE))
    return model.eval()


@pytest.mark.parametrize("name,fpga", [("yolov4-tiny", False), ("yolov3-tiny", True), ("yolo-small", False)])
def test_int8_onnx_follows_tensorrt_rules_and_matches_fake_quant(name, fpga, tmp_path, capsys):
    model = _quantized(name, fpga)
    out = export.main(["--weights", _pt(model, tmp_path / "q.pt"), "--include", "onnx-int8"])[0]
    assert out.name == "q.int8.onnx"
    assert "onnxruntime vs PyTorch fake-quant" in capsys.readouterr().out
    proto = onnx.load(str(out))
    assert tensorrt_rule_violations(proto) == []
    ops = [n.op_type for n in proto.graph.node]
    weight_dq = [n for n in proto.graph.node if n.name.endswith("weight_quant/DequantizeLinear")]
    quantized_convs = sum(1 for m in model.layers if getattr(m, "input_quant", [None])[0] is not None)
    assert len(weight_dq) == quantized_convs > 0
    assert ops.count("QuantizeLinear") + len(weight_dq) == ops.count("DequantizeLinear")  # weights: int8 + DQ
    from models.io import load_model

    reloaded = load_model(tmp_path / "q.pt").eval()  # what export.py read
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    report = compare_steps(out, DetectionsOnly(reloaded), reloaded, x)
    assert report.tensors > 0 and report.worse == 0 and report.max_steps <= 1
    assert report.off_by_one <= 1e-3 * report.values
    if fpga:  # power-of-two scales: every product and sum is exact in float32, so they agree exactly
        assert report.max_steps == 0 and report.box_px < 1e-3


def _int8_initializers(proto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
            if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT32) and i.name.endswith(".codes")}


@pytest.mark.parametrize("name", ["yolov3-tiny", "yolov4-tiny", "yolo-small"])
def test_int8_onnx_for_onnxruntime_runs_every_conv_as_an_integer_kernel(name, tmp_path, capsys):
    model = _quantized(name, False, target="ort")
    out = export.main(["--weights", _pt(model, tmp_path / "q.pt"), "--include", "onnx-int8"])[0]
    printed = capsys.readouterr().out
    convs = sum(isinstance(m, QConvBN) for m in model.layers)
    assert f"onnxruntime runs {convs} QLinearConv and no float conv" in printed
    kernels = ort_kernels(out)
    assert convs == sum(b.type == "convolutional" for b in model.cfg.layers)  # the heads too
    assert kernels["QLinearConv"] == convs and float_kernels(kernels) == 0
    assert kernels["QLinearLeakyRelu"] > 0 and kernels["LeakyRelu"] == 0
    assert kernels["Pad"] == 0 and kernels["MaxPool"] == 0  # darknet's padding folded: uint8 max-pools
    proto = onnx.load(str(out))
    codes = _int8_initializers(proto)  # weights int8, biases int32, no float copy left
    assert sum(k.endswith("weight_quant.codes") for k in codes) == convs
    assert sum(k.endswith("bias_quant.codes") for k in codes) == convs
    floats = sum(i.dims[0] * np.prod(i.dims[1:]) for i in proto.graph.initializer
                 if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4)
    assert floats == 0
    from models.io import load_model

    reloaded = load_model(tmp_path / "q.pt").eval()
    assert reloaded.quant_config.target == "ort"
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    report = compare_steps(out, DetectionsOnly(reloaded), reloaded, x)
    probed, _ = with_codes_as_outputs(out, reloaded)  # what the comparison runs: still integer kernels
    onnx.save(probed, str(tmp_path / "probed.onnx"))
    assert ort_kernels(tmp_path / "probed.onnx")["QLinearConv"] == convs
    preacts = sum(m.preact_quant is not None for m in reloaded.layers if isinstance(m, QConvBN))
    assert preacts > 0 and report.tensors > preacts  # the pre-activation tensors are compared too
    assert report.worse == 0 and report.max_steps <= 1 and report.off_by_one <= 1e-3 * report.values


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_int8_export_of_channels_that_sparse_training_zeroed(target, tmp_path):
    """γ = 0 (the proximal step's exact zeros, kept by rounded widths) folds into all-zero weights with a
    constant bias: the channel takes the conv's largest weight scale; a γ near zero gets a scale its
    bias codes fit int32 with. onnxruntime matches the fake-quant model within a step."""
    torch.manual_seed(0)
    model = tame_model(REPO / "cfg" / "yolo-small.cfg")
    with torch.no_grad():
        for layer in model.layers:
            bn = getattr(layer, "bn", None)
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight[:3] = 0.0
                bn.weight[3] = 1e-20  # nearly zero: a scale from its range would overflow the bias codes
                bn.bias[:4] = torch.linspace(-0.5, 0.5, 4)
    quantize_model(model, QuantConfig(QuantSpec(a_symmetric=target == "trt"), target=target))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, SIZE, SIZE))
    model.eval()
    layer = next(m for m in model.layers if isinstance(m, QConvBN) and m.input_quant[0] is not None)
    codes, s_w, b_codes = layer.integer_params()
    assert (codes[:3] == 0).all() and torch.equal(s_w[:3], s_w.max().expand(3))
    assert (codes[3] == 0).all() and b_codes.abs().max() <= 2 ** 31 - 1
    out = export.main(["--weights", _pt(model, tmp_path / "q.pt"), "--include", "onnx-int8"])[0]
    from models.io import load_model

    reloaded = load_model(tmp_path / "q.pt").eval()
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    report = compare_steps(out, DetectionsOnly(reloaded), reloaded, x)
    assert report.max_steps <= 1


def test_onnxruntime_layout_check_fails_when_a_conv_runs_in_float(tmp_path):
    model = _quantized("yolov3-tiny", False, target="ort")
    out = export.main(["--weights", _pt(model, tmp_path / "q.pt"), "--include", "onnx-int8"])[0]
    proto = onnx.load(str(out))
    # bypass one conv's output quantizer: its Conv now feeds the float LeakyRelu's DequantizeLinear input
    q = next(n for n in proto.graph.node if n.name == "/model/layers.2/preact_quant/QuantizeLinear")
    dq = next(n for n in proto.graph.node if n.input and n.input[0] == q.output[0])
    for n in proto.graph.node:
        n.input[:] = [q.input[0] if t == dq.output[0] else t for t in n.input]
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    assert float_kernels(ort_kernels(tmp_path / "broken.onnx")) == 1
    with pytest.raises(CheckError, match=r"runs 1 conv\(s\) in float"):
        int8_check(model)(tmp_path / "broken.onnx", DetectionsOnly(model), torch.rand(1, 3, SIZE, SIZE))
    # TensorRT's layout leaves every conv in float in onnxruntime: it is not the CPU file
    trt = export.main(["--weights", _pt(_quantized("yolov3-tiny", False), tmp_path / "t.pt"),
                       "--include", "onnx-int8"])[0]
    assert float_kernels(ort_kernels(trt)) > 0


def test_int8_onnx_stores_int8_weights(tmp_path):
    model = _quantized("yolov3-tiny", False)
    out = export.main(["--weights", _pt(model, tmp_path / "q.pt"), "--include", "onnx-int8"])[0]
    float_pt = _pt(tame_model(REPO / "cfg" / "yolov3-tiny.cfg"), tmp_path / "f.pt")
    float_out = export.main(["--weights", float_pt, "--include", "onnx"])[0]
    codes = _int8_initializers(onnx.load(str(out)))
    assert len(codes) == sum(isinstance(m, QConvBN) and m.input_quant[0] is not None for m in model.layers)
    assert all(c.dtype == np.int8 and np.abs(c).max() <= 127 for c in codes.values())
    assert out.stat().st_size < 0.3 * float_out.stat().st_size


def test_tensorrt_rules_catch_broken_graphs(tmp_path):
    model = _quantized("yolov4-tiny", False)
    out = export.main(["--weights", _pt(model, tmp_path / "q.pt"), "--include", "onnx-int8"])[0]
    proto = onnx.load(str(out))
    assert tensorrt_rule_violations(proto) == []

    def broken(edit) -> list[str]:
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        edit(p)
        return tensorrt_rule_violations(p)

    def set_init(p, name, value):
        for init in p.graph.initializer:
            if init.name == name:
                init.CopyFrom(onnx.numpy_helper.from_array(value, name))
                return
        raise AssertionError(name)

    w = next(n for n in proto.graph.node if n.name.endswith("weight_quant/DequantizeLinear"))
    scale = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == w.input[1]))
    ones = np.ones(scale.shape, np.int8)
    assert any("zero point" in b for b in broken(lambda p: set_init(p, w.input[2], ones)))
    assert any("per-channel" in b for b in broken(lambda p: set_init(p, w.input[1], scale[:1].copy())))

    def old_opset(p):
        for o in p.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = 12
    assert any("opset" in b for b in broken(old_opset))

    concat = next(n for n in proto.graph.node if n.op_type == "Concat" and "route" not in n.name
                  and all(i in {o for m in proto.graph.node for o in m.output} for i in n.input)
                  and n.name.startswith("/model/layers."))
    producers = {o: n for n in proto.graph.node for o in n.output}

    def rescale_one_input(p):  # a DequantizeLinear feeding one concat input gets its own scale
        node = producers[concat.input[0]]
        while node.op_type != "DequantizeLinear":
            node = producers[node.input[0]]
        mine = f"{node.name}.own_scale"
        p.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), mine))
        target = next(n for n in p.graph.node if n.name == node.name)
        target.input[1] = mine
    assert any("different scales" in b for b in broken(rescale_one_input))


def test_darknet_weights_of_a_pruned_model_load_in_opencv(tmp_path, capsys):
    model = _pruned().eval()
    out = export.main(["--weights", _pt(model, tmp_path / "p.pt"), "--include", "weights"])
    assert [p.name for p in out] == ["p.cfg", "p.weights"]
    assert "read back with the cfg: max abs diff" in capsys.readouterr().out
    assert_matches_opencv(model, tmp_path, files=tuple(out))


def test_engine_without_tensorrt_keeps_the_onnx_and_prints_trtexec(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    model = _quantized("yolov3-tiny", True)
    pt = _pt(model, tmp_path / "q.pt")
    assert run_cli(export.main, ["--weights", pt, "--include", "onnx-int8", "engine"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensorrt Python package is not installed" in err
    assert f"trtexec --onnx={tmp_path / 'q.int8.onnx'} --saveEngine={tmp_path / 'q.engine'} --int8" in err
    assert (tmp_path / "q.int8.onnx").is_file() and not (tmp_path / "q.engine").exists()
    float_pt = _pt(tame_model(REPO / "cfg" / "yolov3-tiny.cfg"), tmp_path / "f.pt")
    assert run_cli(export.main, ["--weights", float_pt, "--include", "engine", "--half", "--dynamic",
                                 "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--fp16 --minShapes=images:1x3x64x64 --optShapes=images:4x3x64x64" in err


@pytest.mark.parametrize("case", ["int8 of float", "int8 of affine", "weights of quantized",
                                  "onnx of quantized", "engine of ort"])
def test_export_refuses_what_it_cannot_write(case, tmp_path, capsys):
    if case == "int8 of float":
        model = tame_model(REPO / "cfg" / "yolov3-tiny.cfg")
        include, named = "onnx-int8", "the checkpoint is float"
    elif case == "engine of ort":
        model = tame_model(REPO / "cfg" / "yolov3-tiny.cfg")
        quantize_model(model, QuantConfig(QuantSpec(), target="ort"))
        include, named = "engine", "--int8-target trt --a-symmetric"
    else:
        model = tame_model(REPO / "cfg" / "yolov3-tiny.cfg")
        quantize_model(model, QuantConfig(QuantSpec(a_symmetric=case != "int8 of affine")))
        include, named = {"int8 of affine": ("onnx-int8", "--a-symmetric"),
                          "weights of quantized": ("weights", "no darknet form"),
                          "onnx of quantized": ("onnx", "--include onnx-int8")}[case]
    pt = _pt(model, tmp_path / "m.pt")
    assert run_cli(export.main, ["--weights", pt, "--include", include]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and named in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # nothing half-written


# ---------------------------------------------------------------- FPGA package
@pytest.mark.parametrize("name", ["yolov3-tiny", "yolov4-tiny", "yolo-small"])
def test_fpga_reference_equals_the_fake_quant_model_code_for_code(name, tmp_path, capsys):
    import json

    from quant.fpga import compare_with_model, run_reference

    model = _quantized(name, fpga=True)
    out = export.main(["--weights", _pt(model, tmp_path / "q.pt"), "--include", "fpga"])[0]
    assert out == tmp_path / "q_fpga" and "code for code" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    convs = [e for e in manifest["layers"] if e["type"] == "convolutional"]
    assert len(convs) == sum(b.type == "convolutional" for b in model.cfg.layers)
    for e in convs:
        w, b = np.load(out / e["weights"]), np.load(out / e["bias"])
        assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 127 and b.dtype == np.int32
        assert all(isinstance(k, int) for k in e["weight_exponents"])
    by_index = {e["index"]: e for e in manifest["layers"]}

    def quantizer(j):
        src = manifest["input"] if j == "image" else by_index[j]["output"]
        return src["quantizer"], src["exponent"], src["zero_point"]

    joins = [e for e in manifest["layers"] if e["type"] in ("shortcut", "route") and len(e["inputs"]) > 1]
    assert joins and all(len({quantizer(j) for j in e["inputs"]}) == 1 for e in joins)
    image = np.random.default_rng(4).random((3, SIZE, SIZE), dtype=np.float32)  # not the export's image
    result = compare_with_model(out, model, image)
    assert result["mismatched"] == [] and result["layers"] == len(manifest["layers"]) - len(model.heads)
    codes = run_reference(out, image)
    for e in manifest["layers"]:
        if e.get("output"):
            c = codes[str(e["index"])]
            assert c.dtype == np.int64 and e["output"]["qmin"] <= c.min() and c.max() <= e["output"]["qmax"]

    # the comparison can fail: one weight code moved by one step shows at that layer
    first = convs[0]
    w = np.load(out / first["weights"])
    w.flat[np.argmax(np.abs(w))] -= np.sign(w.flat[np.argmax(np.abs(w))])
    np.save(out / first["weights"], w)
    assert compare_with_model(out, model, image)["mismatched"][0].startswith(f"layer {first['index']} ")


def test_fpga_package_refuses_what_has_no_integer_form(tmp_path, capsys):
    from models.cfg import write_cfg
    from tests.test_prune import small_cfg

    float_pt = _pt(tame_model(REPO / "cfg" / "yolov3-tiny.cfg"), tmp_path / "f.pt")
    assert run_cli(export.main, ["--weights", float_pt, "--include", "fpga"]) == 2
    assert "--FPGA" in capsys.readouterr().err
    mish = "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=mish\n"
    (tmp_path / "mish.cfg").write_text(write_cfg(small_cfg(mish)))
    model = tame_model(tmp_path / "mish.cfg")
    quantize_model(model, QuantConfig(QuantSpec(pow2=True), fpga=True))
    assert run_cli(export.main, ["--weights", _pt(model, tmp_path / "m.pt"), "--include", "fpga"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "activation=mish" in err and "m.pt (embedded cfg):7" in err
    assert not (tmp_path / "m_fpga").exists()


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_test_py_runs_a_dynamic_int8_onnx(target, shapes_data, tmp_path):
    """test.py --weights x.int8.onnx runs it in onnxruntime on rectangular batches, in either layout. (An
    untrained model scores near zero either way: the agreement that matters is measured on the
    benchmark, README.)"""
    import test as test_script

    model = _quantized("yolo-small", False, target)
    pt = _pt(model, tmp_path / "q.pt")
    out = export.main(["--weights", pt, "--include", "onnx-int8", "--dynamic"])[0]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].shape[2] == 5 + 6  # static width: readers take the class count from it
    common = ["--data", str(shapes_data), "--img-size", str(SIZE), "--workers", "0", "--conf-thres", "0.0001",
              "--project", str(tmp_path / "t")]
    ref = test_script.main(["--weights", pt, *common, "--name", "pt"])
    got = test_script.main(["--weights", str(out), *common, "--name", "onnx"])
    assert got.map50 == pytest.approx(ref.map50, abs=0.02) and got.map == pytest.approx(ref.map, abs=0.02)
    assert got.speed_ms["inference"] > 0
