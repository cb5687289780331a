"""Every cfg (cfg/, the reference set, tests/data): parse/write, build, forward, backward, fuse, deploy."""

from __future__ import annotations

import copy

import pytest
import torch

from models.cfg import parse_cfg, read_cfg, write_cfg
from models.darknet import Darknet
from models.layers import ConvBN
from models.shapes import infer_shapes
from tests.conftest import rel_err, tame_model

SIZES = (64, 96)  # two input sizes, multiples of 32, small enough for the CPU


def test_parse_write_parse_is_identity(cfg_path):
    cfg = read_cfg(cfg_path)
    text = write_cfg(cfg)
    again = parse_cfg(text, "written")
    assert again == cfg
    assert write_cfg(again) == text  # and writing is stable
    assert [b.type for b in again.layers] == [b.type for b in cfg.layers]


def test_forward_at_two_sizes(cfg_path):
    model = tame_model(cfg_path)
    cfg = model.cfg
    for size in SIZES:
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            dets, raw = model(x)
        shapes = infer_shapes(cfg, size, size)
        assert len(raw) == len(cfg.heads)
        for head_index, p, head in zip(cfg.heads, raw, model.yolo_heads):
            s = shapes[head_index]
            assert p.shape == (2, head.na, s.h, s.w, cfg.classes + 5)
        n = sum(p.shape[1] * p.shape[2] * p.shape[3] for p in raw)
        assert dets.shape == (2, n, cfg.classes + 5)
        assert torch.isfinite(dets).all()
        scores = dets[..., 4:]
        assert (scores >= 0).all() and (scores <= 1).all()
        # boxes are in input pixels: centres lie on the grid of each head, inside a stride margin
        assert dets[..., 0].min() > -size / 2 and dets[..., 0].max() < 1.5 * size
        # head strides follow from feature shapes, not from head order
        strides = sorted(size // p.shape[2] for p in raw)
        assert strides == sorted(model.strides(size))


def test_train_mode_returns_raw_and_backward_is_finite(cfg_path):
    model = tame_model(cfg_path).train()
    out = model(torch.rand(2, 3, 64, 64))
    assert isinstance(out, list) and len(out) == len(model.heads)
    loss = sum((p.float() ** 2).mean() for p in out)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    # the head convs (the last conv before each [yolo]) always learn
    for i in model.heads:
        assert model.layers[i - 1].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 5e-5)])
def test_fuse_matches_unfused(cfg_path, dtype, tol):
    # float64 shows the folding itself is exact (measured <= 3e-14). float32 adds the rounding of
    # a different operation order: below 1e-5 for most cfgs, up to 1.5e-5 for yolov4x-mish over
    # 8 random inputs, so its bound is 5e-5 on a fixed input.
    model = tame_model(cfg_path).to(dtype)
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        ref, _ = model(x)
        fused = copy.deepcopy(model).fuse()
        out, _ = fused(x)
    assert fused.fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol


def test_deploy_matches_unfused_and_leaves_its_input_alone(cfg_path):
    # deploy() = fuse + in-place conv activations + channels-last weights: the same detections and
    # raw maps as the training-form model (float32 rounding, as for fuse), and the image untouched
    model = tame_model(cfg_path)
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    image = x.clone()
    with torch.no_grad():
        ref, ref_raw = model(x)
        deployed = copy.deepcopy(model).deploy()
        out, raw = deployed(x)
    assert not deployed.training and deployed.fused
    assert torch.equal(x, image)
    assert rel_err(out, ref) < 5e-5
    assert all(rel_err(p, q) < 5e-5 for p, q in zip(raw, ref_raw))
    convs = [m.conv for m in deployed.layers if isinstance(m, ConvBN)]
    kernels = [c.weight for c in convs if c.weight.shape[-1] > 1]
    assert kernels and all(w.is_contiguous(memory_format=torch.channels_last) for w in kernels)
    acts = [m.act for m in deployed.layers if isinstance(m, ConvBN) and hasattr(m.act, "inplace")]
    assert acts and all(a.inplace for a in acts)


def test_input_size_not_multiple_of_stride_is_a_clear_error():
    from utils.errors import UserError

    model = Darknet("cfg/yolov3-tiny.cfg").eval()
    with pytest.raises(UserError, match="multiples of 32"):
        model(torch.rand(1, 3, 100, 100))


def test_head_strides_of_yolov4_start_at_8():
    model = Darknet("cfg/yolov4.cfg")
    assert model.strides(416) == [8, 16, 32]
    assert Darknet("cfg/yolov3.cfg").strides(416) == [32, 16, 8]
