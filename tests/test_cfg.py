"""The cfg parser: darknet's defaults and aliases, and a clear error for every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.cfg import parse_cfg, write_cfg
from models.darknet import Darknet
from models.shapes import infer_shapes
from tests.conftest import REPO
from utils.errors import UserError

NET = "[net]\nwidth=64\nheight=64\nchannels=3\n"
CONV = "[convolutional]\nbatch_normalize=1\nfilters={f}\nsize=3\nstride={s}\npad=1\nactivation=leaky\n"
HEAD = ("[convolutional]\nfilters={f}\nsize=1\nstride=1\nactivation=linear\n"
        "[yolo]\nmask=0,1,2\nanchors=10,14, 23,27, 37,58\nclasses=2\nnum=3\n")


def tiny(*middle: str, head_filters: int = 21) -> str:
    """A valid network: conv(8,s2), conv(16,s2), *middle, head conv + yolo."""
    return NET + CONV.format(f=8, s=2) + CONV.format(f=16, s=2) + "".join(middle) + \
        HEAD.format(f=head_filters)


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line number of the nth line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[nth - 1]


def test_darknet_defaults():
    cfg = parse_cfg(NET + "[convolutional]\nfilters=4\n[maxpool]\nstride=2\n[maxpool]\nsize=3\n"
                    + HEAD.format(f=21))
    conv, pool, pool2 = cfg.layers[:3]
    assert conv["activation"] == "logistic"  # darknet's surprising default
    assert (conv["size"], conv["stride"], conv["pad"], conv["batch_normalize"]) == (1, 1, 0, 0)
    assert (pool["size"], pool["stride"], pool["padding"]) == (2, 2, 1)
    assert (pool2["size"], pool2["stride"], pool2["padding"]) == (3, 1, 2)
    # the writer says which activation a conv uses, since OpenCV's default (linear) differs
    assert "activation=logistic" in write_cfg(cfg).split("[maxpool]")[0]


def test_aliases_comments_and_spacing():
    text = ("# a comment\n[network]\nwidth = 64   # inline comment\nheight=64\n; another\n"
            "[conv]\nfilters=4\nsize=3\npad=1\nactivation = leaky\n[max]\nsize=2\nstride=2\n"
            + HEAD.format(f=21).replace("anchors=10,14, 23,27, 37,58", "anchors = 10,14, 23,27, 37,58,"))
    cfg = parse_cfg(text)
    assert cfg.net["width"] == 64
    assert [b.type for b in cfg.layers] == ["convolutional", "maxpool", "convolutional", "yolo"]
    assert cfg.layers[-1]["anchors"] == [10, 14, 23, 27, 37, 58]


def test_maxpool_size2_stride1_keeps_the_size_and_pads_right_bottom():
    cfg = parse_cfg(NET + "[maxpool]\nsize=2\nstride=1\n[convolutional]\nfilters=21\nsize=1\n"
                    "activation=linear\n" + HEAD.format(f=21).split("\n", 5)[-1].replace(
                        "[yolo]", "[yolo]", 1))
    pool = Darknet(cfg).layers[0]
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = pool(x)
    assert y.shape == x.shape
    # darknet pads (size-1) split as 0 before, 1 after: the last column/row compares with -inf
    expected = torch.tensor([[5, 6, 7, 7], [9, 10, 11, 11], [13, 14, 15, 15], [13, 14, 15, 15.0]])
    assert torch.equal(y[0, 0], expected)


def darknet_maxpool(x: torch.Tensor, size: int, stride: int, padding: int) -> torch.Tensor:
    """darknet's forward_maxpool_layer, loop for loop: output (in + padding - size) / stride + 1, the
    window starting padding // 2 before the map, positions outside it skipped."""
    c, h, w = x.shape[1:]
    oh, ow = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    y = torch.full((1, c, oh, ow), float("-inf"))
    for i in range(oh):
        for j in range(ow):
            for n in range(size):
                for m in range(size):
                    r, s = i * stride + n - padding // 2, j * stride + m - padding // 2
                    if 0 <= r < h and 0 <= s < w:
                        y[0, :, i, j] = torch.maximum(y[0, :, i, j], x[0, :, r, s])
    return y


@pytest.mark.parametrize("size,stride,padding,own", [(3, 1, 2, True), (5, 1, 4, True), (9, 1, 8, True),
                                                    (13, 1, 12, True), (5, 1, 2, True), (3, 2, 2, True),
                                                    (2, 2, 2, True), (2, 2, 1, False), (2, 1, 4, False)])
def test_maxpool_padding_inside_the_pool_or_before_it_is_darknets(size, stride, padding, own):
    """An even padding of at most half the window (SPP's) is the pool's own, others an explicit -inf
    pad first: on all-negative maps both must match darknet's loop, border positions included."""
    head = "[convolutional]\nfilters=21\nsize=1\nactivation=linear\n" + HEAD.format(f=21).split("\n", 5)[-1]
    cfg = parse_cfg(NET + f"[maxpool]\nsize={size}\nstride={stride}\npadding={padding}\n" + head)
    pool = Darknet(cfg).layers[0]
    x = -1 - torch.rand(1, 4, 11, 11)
    assert torch.equal(pool(x), darknet_maxpool(x, size, stride, padding))
    p = padding
    assert pool.pad == (p // 2, p - p // 2, p // 2, p - p // 2)  # darknet's, as the FPGA package describes it
    ops = [n.target for n in torch.fx.symbolic_trace(pool).graph.nodes if n.op == "call_function"]
    assert (torch.nn.functional.pad in ops) != own


def test_route_groups_take_the_group_id_slice():
    text = tiny("[route]\nlayers=-1\ngroups=2\ngroup_id=1\n")
    model = Darknet(parse_cfg(text))
    x = torch.rand(1, 16, 4, 4)
    assert torch.equal(model.layers[2](x), x[:, 8:])
    assert infer_shapes(model.cfg)[2].c == 8


def test_yolo_decode_follows_darknet_formulas():
    text = tiny().replace("num=3\n", "num=3\nscale_x_y=1.2\n")
    head = Darknet(parse_cfg(text)).yolo_heads[0]
    p = torch.zeros(1, 3, 2, 2, 7)
    p[0, 1, 1, 0, :4] = torch.tensor([0.5, -1.0, 0.3, -0.2])
    d = head.decode(p, 64, 64).view(1, 3, 2, 2, 7)[0, 1, 1, 0]
    s, stride = 1.2, 32  # 64-pixel input, 2x2 map
    sig = torch.sigmoid
    assert torch.allclose(d[0], (sig(torch.tensor(0.5)) * s - 0.1 + 0) * stride)
    assert torch.allclose(d[1], (sig(torch.tensor(-1.0)) * s - 0.1 + 1) * stride)
    assert torch.allclose(d[2], torch.exp(torch.tensor(0.3)) * 23)
    assert torch.allclose(d[3], torch.exp(torch.tensor(-0.2)) * 27)
    assert torch.allclose(d[4:], torch.full((3,), 0.5))
    # new_coords: the conv already applied the logistic; w = 4 * t^2 * anchor, no sigmoid on scores
    head.new_coords = True
    q = torch.full((1, 3, 2, 2, 7), 0.25)
    d = head.decode(q, 64, 64).view(1, 3, 2, 2, 7)[0, 2, 0, 1]
    assert torch.allclose(d[0], torch.tensor((0.25 * s - 0.1 + 1) * stride))
    assert torch.allclose(d[2:4], torch.tensor([4 * 0.0625 * 37, 4 * 0.0625 * 58]))
    assert torch.allclose(d[4:], torch.full((3,), 0.25))


BAD_CFGS = {
    "unknown section": (tiny("[upsampl]\nstride=2\n"), "[upsampl]", r"unknown section \[upsampl\]"),
    "unknown key": (tiny().replace("filters=16", "filter=16"), "filter=16",
                    r"unknown option 'filter' in \[convolutional\]"),
    "bad value": (tiny().replace("filters=16", "filters=sixteen"), "filters=sixteen",
                  r"filters=sixteen: expected an integer"),
    "negative size": (tiny().replace("size=3\nstride=2\npad=1\nactivation=leaky\n[conv", "size=-3\nstride=2"
                                     "\npad=1\nactivation=leaky\n[conv", 1), "size=-3", "must be >= 1"),
    "unknown activation": (tiny().replace("activation=leaky", "activation=leakyy", 1), "leakyy",
                           "unknown activation 'leakyy'"),
    "duplicate key": (tiny().replace("filters=8", "filters=8\nfilters=9"), "filters=9", "given twice"),
    "route out of range": (tiny("[route]\nlayers=-5\n"), "[route]", r"layers=-5 points to layer -3"),
    "route forward": (tiny("[route]\nlayers=7\n"), "[route]", "can only use layers 0..1"),
    "shortcut out of range": (tiny("[shortcut]\nfrom=-9\n"), "[shortcut]", r"from=-9 points to layer"),
    "shortcut shape": (tiny("[shortcut]\nfrom=-2\n"), "[shortcut]", r"cannot add layer 0 \(8x32x32\)"),
    "route spatial": (tiny("[route]\nlayers=-1,-2\n"), "[route]", "spatial sizes differ"),
    "head filters": (tiny(head_filters=255), "filters=255", r"needs len\(mask\) \* \(classes \+ 5\) = "
                     r"3 \* \(2 \+ 5\) = 21 \(set filters=21\)"),
    "mask outside num": (tiny().replace("mask=0,1,2", "mask=0,1,3"), "[yolo]", "outside 0..2"),
    "anchors count": (tiny().replace("anchors=10,14, 23,27, 37,58", "anchors=10,14, 23,27, 37"),
                      "[yolo]", "anchors has 5 numbers but num=3 needs 6"),
    "unsupported key": (tiny().replace("filters=8", "filters=8\ndilation=2"), "dilation",
                        "not supported by this project"),
    "option before section": ("width=3\n" + tiny(), "width=3", "before the first"),
    "no equals sign": (tiny().replace("pad=1", "pad 1", 1), "pad 1", "expected 'key=value'"),
    "dropout probability": (tiny("[dropout]\nprobability=1.5\n"), "probability", r"must be in \[0, 1\)"),
    "groups do not divide": (tiny().replace("filters=16", "filters=16\ngroups=3"), "groups=3",
                             "groups=3 must divide"),
}


@pytest.mark.parametrize("case", BAD_CFGS, ids=list(BAD_CFGS))
def test_bad_cfg_gives_file_and_line(case, tmp_path):
    text, needle, message = BAD_CFGS[case]
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        Darknet(path)
    # the error names the file and the line of the offending section or option
    where = str(e.value).split(" ")[0]
    file, line = where.split(":")[:2]
    assert file == str(path)
    block_line = line_of(text, needle)
    assert int(line) <= block_line and block_line - int(line) < 9, (line, block_line, str(e.value))


def test_structure_errors():
    with pytest.raises(UserError, match="first section must be"):
        parse_cfg("[convolutional]\nfilters=3\n")
    with pytest.raises(UserError, match="no sections"):
        parse_cfg("# only a comment\n")
    with pytest.raises(UserError, match="no layers"):
        parse_cfg(NET)
    with pytest.raises(UserError, match="no \\[yolo\\] head"):
        Darknet(parse_cfg(NET + CONV.format(f=8, s=1)))
    with pytest.raises(UserError, match="too small"):
        small = tiny().replace("width=64\nheight=64", "width=2\nheight=2").replace("pad=1", "pad=0")
        Darknet(parse_cfg(small))
    # a network without any spatial layer still builds (its largest stride is 1)
    flat = NET + "[avgpool]\n" + HEAD.format(f=21)
    assert Darknet(parse_cfg(flat)).max_stride == 1


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown key", "head filters", "route out of range"])
def test_cli_prints_one_line_and_exits_2(case, tmp_path):
    path = tmp_path / "bad.cfg"
    path.write_text(BAD_CFGS[case][0])
    r = run_script("summary.py", "--cfg", str(path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:")


@pytest.mark.slow
def test_cli_bad_weights_file(tmp_path):
    (tmp_path / "short.weights").write_bytes(b"\0" * 40)
    r = run_script("summary.py", "--cfg", "cfg/yolov3-tiny.cfg",
                   "--weights", str(tmp_path / "short.weights"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # version 0.0 header: 3 int32 + int32 seen = 16 bytes, so 24 bytes = 6 floats remain
    assert "needs 8858734 weights after the header, the file has 6: it ends inside layer 0" in r.stderr


@pytest.mark.slow
def test_cli_summary_prints_the_model():
    r = run_script("summary.py", "--cfg", "cfg/yolov3.cfg", "--img-size", "416")
    assert r.returncode == 0, r.stderr
    assert "61.949 M parameters" in r.stdout  # yolov3: 61,949,149 parameters, as darknet reports
    assert "heads: 3 at strides 32, 16, 8; classes: 80" in r.stdout


def test_writer_round_trips_a_modified_cfg(tmp_path):
    cfg = parse_cfg(Path(REPO / "cfg/yolov4-tiny.cfg").read_text(), "yolov4-tiny.cfg")
    cfg.layers[0].set("filters", 24)
    path = tmp_path / "pruned.cfg"
    path.write_text(write_cfg(cfg))
    model = Darknet(path)
    assert model.layers[0].conv.out_channels == 24 and model.layers[1].conv.in_channels == 24


def test_heads_must_agree_on_classes():
    text = tiny() + "[route]\nlayers=-3\n" + HEAD.format(f=24).replace("classes=2", "classes=3")
    with pytest.raises(UserError, match=r"heads disagree on classes \(\[2, 3\]\)"):
        Darknet(parse_cfg(text))
