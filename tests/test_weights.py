"""Darknet .weights and .pt checkpoints: exact round trips, partial loads, class transfer, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.cfg import read_cfg
from models.darknet import Darknet
from models.io import (
    conv_specs,
    load_checkpoint,
    load_darknet_weights,
    load_model,
    save_checkpoint,
    save_darknet_weights,
    with_classes,
)
from tests.conftest import tame_model
from utils.errors import UserError


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _conv_state(model):
    """The tensors a .weights file stores (it has no num_batches_tracked)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_weights_round_trip_is_bit_exact(cfg_path, tmp_path):
    model = tame_model(cfg_path)
    model.seen = 123456789012
    path = tmp_path / "m.weights"
    save_darknet_weights(model, path)
    n_floats = sum(s.size for s in conv_specs(model.cfg))
    assert path.stat().st_size == 20 + 4 * n_floats  # 3 int32 + int64 seen + float32 body
    fresh = Darknet(model.cfg)
    report = load_darknet_weights(fresh, path)
    assert not report.skipped and report.loaded == len(_conv_state(model))
    a, b = _conv_state(model), _conv_state(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.seen == 123456789012
    save_darknet_weights(fresh, tmp_path / "again.weights")
    assert (tmp_path / "again.weights").read_bytes() == path.read_bytes()


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    model = tame_model(Path("cfg/yolov4-tiny.cfg"))
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, epoch=3, note="test")
    ckpt = torch.load(path, weights_only=True)  # plain data only
    assert ckpt["meta"] == {"epoch": 3, "note": "test"}
    loaded = load_model(path).eval()
    assert _states_equal(model, loaded)
    assert loaded.cfg == model.cfg
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind


def _old_header_file(path, body: np.ndarray, major=0, minor=1):
    with open(path, "wb") as f:
        f.write(np.array([major, minor, 0], "<i4").tobytes())
        f.write(np.array([7], "<i4").tobytes())  # version 0.1: seen is int32
        f.write(body.astype("<f4").tobytes())


def test_old_header_with_int32_seen(tmp_path):
    model = tame_model(Path("cfg/yolov3-tiny.cfg"))
    save_darknet_weights(model, tmp_path / "new.weights")
    body = np.fromfile(tmp_path / "new.weights", "<f4", offset=20)
    _old_header_file(tmp_path / "old.weights", body)
    fresh = Darknet(model.cfg)
    load_darknet_weights(fresh, tmp_path / "old.weights")
    assert fresh.seen == 7
    assert all(torch.equal(a, b) for a, b in zip(_conv_state(model).values(), _conv_state(fresh).values()))


def test_transposed_weights_are_refused(tmp_path):
    _old_header_file(tmp_path / "t.weights", np.zeros(10), major=1001)
    with pytest.raises(UserError, match="transposed"):
        load_darknet_weights(Darknet("cfg/yolov3-tiny.cfg"), tmp_path / "t.weights")


def test_backbone_prefix_and_cutoff(tmp_path):
    """A backbone-only file (like darknet53.conv.74) loads with cutoff and says so without it."""
    model = tame_model(Path("cfg/yolov3.cfg"))
    path = tmp_path / "darknet53.conv.74"
    save_darknet_weights(model, path, cutoff=74)
    fresh = Darknet("cfg/yolov3.cfg")
    with pytest.raises(UserError, match=r"exactly layers 0\.\.73.*cutoff=74"):
        load_darknet_weights(fresh, path)
    before = _conv_state(fresh)
    before = {k: v.clone() for k, v in before.items()}
    report = load_darknet_weights(fresh, path, cutoff=74)
    after, ref = _conv_state(fresh), _conv_state(model)
    for k in after:
        layer = int(k.split(".")[1])
        assert torch.equal(after[k], ref[k] if layer < 74 else before[k]), k
    assert report.loaded == sum(len(s.tensors) for s in conv_specs(fresh.cfg) if s.index < 74)
    # a full file also loads with a cutoff (darknet's partial load); the rest is ignored
    save_darknet_weights(model, tmp_path / "full.weights")
    partial = Darknet("cfg/yolov3.cfg")
    initial = {k: v.clone() for k, v in _conv_state(partial).items()}
    load_darknet_weights(partial, tmp_path / "full.weights", cutoff=74)
    for k, v in _conv_state(partial).items():
        assert torch.equal(v, ref[k] if int(k.split(".")[1]) < 74 else initial[k]), k
    # backbone files keep darknet's names; anything but .pt is read as darknet weights
    assert load_model(path, "cfg/yolov3.cfg", cutoff=74).layers[0].conv.weight.equal(
        model.layers[0].conv.weight)
    for bad in (0, -5):
        with pytest.raises(UserError, match="must be at least 1"):
            load_darknet_weights(Darknet("cfg/yolov3.cfg"), path, cutoff=bad)


def test_cutoff_past_a_head_with_another_class_count(tmp_path):
    """Past a head conv, a longer file is read as its own class count or refused, never shifted."""
    coco = tame_model(Path("cfg/yolov3-tiny.cfg"))
    save_darknet_weights(coco, tmp_path / "coco.weights")
    three = Darknet(with_classes(coco.cfg, 3))
    initial = {k: v.clone() for k, v in _conv_state(three).items()}
    report = load_darknet_weights(three, tmp_path / "coco.weights", cutoff=20)
    assert any("80 classes" in n for n in report.notes)
    assert sorted(report.skipped) == [
        "layers.15.conv.bias (shape (255,) in the weights, (24,) in the model)",
        "layers.15.conv.weight (shape (255, 512, 1, 1) in the weights, (24, 512, 1, 1) in the model)"]
    ref = _conv_state(coco)
    for k, v in _conv_state(three).items():
        layer = int(k.split(".")[1])
        assert torch.equal(v, ref[k] if layer < 20 and layer != 15 else initial[k]), k
    # a file that fits no class count is refused, even though it is longer than the prefix
    with open(tmp_path / "coco.weights", "ab") as f:
        f.write(np.zeros(5, "<f4").tobytes())
    with pytest.raises(UserError, match="head conv"):
        load_darknet_weights(Darknet("cfg/yolov3-tiny.cfg"), tmp_path / "coco.weights", cutoff=20)


def test_seen_is_unsigned_and_short_headers_are_refused(tmp_path):
    body = np.zeros(sum(s.size for s in conv_specs(read_cfg("cfg/yolov3-tiny.cfg"))), "<f4")
    with open(tmp_path / "old.weights", "wb") as f:
        f.write(np.array([0, 1, 0], "<i4").tobytes() + np.array([3_000_000_000], "<u4").tobytes())
        f.write(body.tobytes())
    model = Darknet("cfg/yolov3-tiny.cfg")
    load_darknet_weights(model, tmp_path / "old.weights")
    assert model.seen == 3_000_000_000
    (tmp_path / "h18.weights").write_bytes(np.array([0, 2, 0], "<i4").tobytes() + b"\0" * 6)
    with pytest.raises(UserError, match="18 bytes is too short"):
        load_darknet_weights(model, tmp_path / "h18.weights")


def test_truncated_weights_name_the_layer(tmp_path):
    model = tame_model(Path("cfg/yolov3-tiny.cfg"))
    path = tmp_path / "t.weights"
    save_darknet_weights(model, path)
    data = path.read_bytes()
    (tmp_path / "cut.weights").write_bytes(data[:-400])
    with pytest.raises(UserError) as e:
        load_darknet_weights(Darknet("cfg/yolov3-tiny.cfg"), tmp_path / "cut.weights")
    msg = str(e.value)
    n = sum(s.size for s in conv_specs(model.cfg))
    assert f"needs {n} weights" in msg and f"has {n - 100}" in msg
    assert "ends inside layer 22" in msg and "cfg/yolov3-tiny.cfg:" in msg
    (tmp_path / "odd.weights").write_bytes(data[:-2])
    with pytest.raises(UserError, match="whole number of float32"):
        load_darknet_weights(Darknet("cfg/yolov3-tiny.cfg"), tmp_path / "odd.weights")
    (tmp_path / "tiny.weights").write_bytes(data[:10])
    with pytest.raises(UserError, match="too short"):
        load_darknet_weights(Darknet("cfg/yolov3-tiny.cfg"), tmp_path / "tiny.weights")


def test_weights_too_long_for_the_cfg(tmp_path):
    save_darknet_weights(tame_model(Path("cfg/yolov3-tiny.cfg")), tmp_path / "t.weights")
    with open(tmp_path / "t.weights", "ab") as f:
        f.write(np.zeros(5, "<f4").tobytes())
    with pytest.raises(UserError, match="different cfg"):
        load_darknet_weights(Darknet("cfg/yolov3-tiny.cfg"), tmp_path / "t.weights")
    # weights of a bigger network entirely
    save_darknet_weights(Darknet("cfg/yolov4-tiny.cfg"), tmp_path / "v4.weights")
    with pytest.raises(UserError, match=r"needs \d+ weights .* the file has \d+"):
        load_darknet_weights(Darknet("cfg/yolov3-tiny.cfg"), tmp_path / "v4.weights")


def test_class_count_transfer_skips_and_reports_heads(tmp_path):
    coco = tame_model(Path("cfg/yolov3-tiny.cfg"))
    save_darknet_weights(coco, tmp_path / "coco.weights")
    three = Darknet(with_classes(read_cfg("cfg/yolov3-tiny.cfg"), 3))
    assert three.cfg.classes == 3 and three.layers[15].conv.out_channels == 24
    report = load_darknet_weights(three, tmp_path / "coco.weights")
    assert any("80 classes" in n for n in report.notes)
    head_keys = {f"layers.{i - 1}.conv.{t}" for i in three.heads for t in ("weight", "bias")}
    assert {s.split(" ")[0] for s in report.skipped} == head_keys
    ref, got = _conv_state(coco), _conv_state(three)
    for k in got:
        if k not in head_keys:
            assert torch.equal(got[k], ref[k]), k
    # load_model does the same for cfg + .weights
    model = load_model(tmp_path / "coco.weights", three.cfg)
    assert model.cfg.classes == 3


def test_checkpoint_into_a_cfg_with_other_classes(tmp_path):
    coco = tame_model(Path("cfg/yolov3-tiny.cfg"))
    save_checkpoint(tmp_path / "coco.pt", coco)
    with pytest.raises(UserError, match=r"classes=80 in the \.pt, 5 in the cfg"):  # outside training: refused
        load_model(tmp_path / "coco.pt", with_classes(coco.cfg, 5))
    model = load_model(tmp_path / "coco.pt", with_classes(coco.cfg, 5), transfer=True)  # training's transfer
    assert model.cfg.classes == 5
    assert torch.equal(model.layers[0].conv.weight, coco.layers[0].conv.weight)


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match="give its --cfg"):
        load_model(tmp_path / "x.weights")
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "x.weights", "cfg/yolov3-tiny.cfg")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_model(tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"\.onnx files are not model weights"):
        load_model(tmp_path / "x.onnx", "cfg/yolov3-tiny.cfg")
    with pytest.raises(UserError, match=r"weights .*: cannot read it"):
        load_model(tmp_path, "cfg/yolov3-tiny.cfg")  # a directory
    torch.save({"format": "yolo-compress-checkpoint", "version": 1}, tmp_path / "empty.pt")
    with pytest.raises(UserError, match="lacks the cfg text"):
        load_model(tmp_path / "empty.pt")
    torch.save({"some": "dict"}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_fused_models_refuse_to_save(tmp_path):
    model = Darknet("cfg/yolov3-tiny.cfg").fuse()
    with pytest.raises(UserError, match="fused"):
        save_darknet_weights(model, tmp_path / "f.weights")
    with pytest.raises(UserError, match="fuse"):
        save_checkpoint(tmp_path / "f.pt", model)


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    model = Darknet("tests/data/exotic-layers.cfg")
    save_darknet_weights(model, tmp_path / "a.weights")
    save_checkpoint(tmp_path / "a.pt", model)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.weights", "a.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
