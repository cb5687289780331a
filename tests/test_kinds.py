"""The layer kind table: every walker asks it, so a new kind is one entry and an unknown one one error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.cfg import Block, parse_cfg, read_cfg, write_cfg
from models.darknet import Darknet
from models.graph import ChannelGraph
from models.kinds import KINDS, PASS, LayerKind, Shape, kind_of, registered
from models.options import POSITIVE, opt
from models.quantized.convert import QuantConfig, quantize_model
from models.quantized.modules import QuantSpec
from models.shapes import infer_shapes, layer_inputs
from prune.cli import apply_method
from quant.fpga import INTEGER_FORMS
from tests.conftest import CFGS, cfg_id
from utils.errors import UserError
from utils.torch_utils import tame_random_weights


class Passthrough(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.times = block["times"]

    def forward(self, x):
        return x


TOY = LayerKind("reorg3d_test", {"times": opt(POSITIVE, 1)}, lambda b, ins, w: ins[0],
                lambda b, ins: Passthrough(b), channels=PASS)

TOY_CFG = """[net]
width=64
height=64
channels=3
[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky
[reorg3d_test]
times=2
[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky
[reorg3d_test]
[convolutional]
filters=18
size=1
stride=1
activation=linear
[yolo]
mask=0,1,2
anchors=10,14,23,27,37,58
classes=1
num=3
"""


def test_a_new_kind_is_one_table_entry_for_every_walker():
    """Parse, write, shapes, build, run, channel graph, prune (with compensation) and quantize a cfg
    holding a kind the walkers have never heard of, with no walker edited."""
    with registered(TOY):
        cfg = parse_cfg(TOY_CFG, "toy.cfg")
        assert parse_cfg(write_cfg(cfg)) == cfg
        assert cfg.layers[1]["times"] == 2 and cfg.layers[3]["times"] == 1  # given, and the default
        assert [s.c for s in infer_shapes(cfg)] == [16, 16, 16, 16, 18, 18]
        model = tame_random_weights(Darknet(cfg), seed=0, img_size=64).eval()
        with torch.no_grad():
            dets, _ = model(torch.rand(1, 3, 64, 64))
        assert dets.shape == (1, 3 * 16 * 16, 6)  # 3 anchors on the 16x16 map after two stride-2 convs
        graph = ChannelGraph(cfg)
        assert graph.consumers(0) == [2] and graph.consumers(2) == [4]  # through the toy layers
        pruned, _ = apply_method(model, "normal", percent=0.3, round_to=1)
        assert pruned.cfg.layers[0]["filters"] < 16 and pruned.cfg.layers[1].type == "reorg3d_test"
        with torch.no_grad():
            pruned.eval()(torch.rand(1, 3, 64, 64))
        q = quantize_model(Darknet(cfg), QuantConfig(QuantSpec(a_symmetric=True)))
        with torch.no_grad():
            q.train()(torch.rand(2, 3, 64, 64))
            q.eval()(torch.rand(1, 3, 64, 64))
    with pytest.raises(UserError, match=r"toy.cfg:12: unknown section \[reorg3d_test\]"):
        parse_cfg(TOY_CFG, "toy.cfg")  # gone with the entry


def test_an_unknown_kind_is_one_error_for_every_walker():
    with pytest.raises(UserError, match=r"unknown section \[reorg\]; this project supports \[net\]"):
        parse_cfg("[net]\n[reorg]\n", "x.cfg")
    # a block made in code, not parsed: every walker refuses it the same way
    cfg = read_cfg("cfg/yolov3-tiny.cfg")
    cfg.layers.insert(1, Block("reorg", {}, 99, "code"))
    for walker in (layer_inputs, infer_shapes, ChannelGraph, Darknet, write_cfg):
        with pytest.raises(UserError, match=r"code:99 \[reorg\]: unknown section \[reorg\]"):
            walker(cfg)


def test_the_fpga_package_and_the_table_agree_on_integer_forms():
    assert set(INTEGER_FORMS) == {name for name, k in KINDS.items() if k.fpga is not None}


def test_every_kind_is_used_by_a_cfg_the_tests_run():
    """The parametrized cfg tests reach every kind in the table (a kind no cfg uses is untested)."""
    used = {b.type for path in CFGS for b in read_cfg(path).layers}
    assert set(KINDS) <= used, set(KINDS) - used


@pytest.mark.parametrize("path", CFGS, ids=cfg_id)
def test_every_layer_of_every_cfg_has_a_module_and_a_shape(path):
    cfg = read_cfg(path)
    shapes = infer_shapes(cfg, 64, 64)
    model = Darknet(cfg)
    for b, layer, shape in zip(cfg.layers, model.layers, shapes):
        kind = kind_of(b)
        assert isinstance(layer, nn.Module) and isinstance(shape, Shape)
        assert kind.head == (b.type == "yolo")
