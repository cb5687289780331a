"""The channel graph: traced origins checked against the real modules, residual chains, grouped
routes, channel scaling, fixed convs and consumers."""

from __future__ import annotations

import pytest
import torch

from models.cfg import parse_cfg, read_cfg
from models.darknet import Darknet
from models.graph import ChannelGraph
from tests.conftest import REPO

CFGS = [*sorted((REPO / "cfg").glob("*.cfg")), REPO / "tests" / "data" / "exotic-layers.cfg"]


@pytest.mark.parametrize("path", CFGS, ids=lambda p: p.stem)
def test_origins_match_what_the_modules_compute(path):
    """Convs output a random constant per channel; adds and multiplies (and their activations) are
    replaced by a plain sum of their inputs, so each channel's value is the sum of its origins."""
    cfg = read_cfg(path)
    graph = ChannelGraph(cfg)
    model = Darknet(cfg).double().eval()
    gen = torch.Generator().manual_seed(0)
    codes: dict[tuple[int, int], float] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(i, block):
        def run(module, args, out):
            if block.type == "convolutional":
                v = torch.randn(out.shape[1], generator=gen, dtype=torch.float64)
                codes.update({(i, c): float(v[c]) for c in range(len(v))})
                out = v.view(1, -1, 1, 1).expand_as(out).clone()
            elif block.type in ("shortcut", "scale_channels", "sam"):
                out = sum(torch.broadcast_tensors(*args))
            elif block.type == "upsample":
                out = out / block["scale"]
            outputs[i] = out
            return out
        return run

    for i, (layer, block) in enumerate(zip(model.layers, cfg.layers)):
        layer.register_forward_hook(hook(i, block))
    size = 2 * model.max_stride
    with torch.no_grad():
        model(torch.zeros(1, cfg.net["channels"], size, size, dtype=torch.float64))
    for i, b in enumerate(cfg.layers):
        if b.type == "yolo":  # its module returns the reshaped head map; the graph passes its input on
            continue
        out = outputs[i][0]
        assert out.shape[0] == len(graph.origins[i]), i
        want = torch.tensor([sum(codes[ch] for ch in chans) for chans in graph.origins[i]],
                            dtype=torch.float64)
        torch.testing.assert_close(out, want.view(-1, 1, 1).expand_as(out), msg=f"layer {i} [{b.type}]")


def test_residual_chains_and_heads_of_yolov3():
    graph = ChannelGraph(read_cfg(REPO / "cfg" / "yolov3.cfg"))
    # darknet-53: 1, 2, 8, 8, 4 residual blocks; each chain is the downsampling conv plus the blocks
    assert [len(c) for c in graph.chains()] == [2, 3, 9, 9, 5]
    assert graph.chains()[0] == [1, 3]
    assert graph.tied_convs(3) == {1}
    assert graph.fixed_reason(2) is None and graph.fixed_reason(1) is None
    heads = [i - 1 for i in graph.cfg.heads]
    assert all("[yolo] head" in graph.fixed_reason(i) for i in heads)
    assert graph.consumers(1) == [2, 5]  # conv 2 reads conv 1 directly, conv 5 reads the shortcut sum


def test_grouped_route_ties_matching_positions_of_its_slices():
    """yolov4-tiny's CSP route takes the second half of a conv: channel k is tied to k + half."""
    cfg = read_cfg(REPO / "cfg" / "yolov4-tiny.cfg")
    graph = ChannelGraph(cfg)
    route = next(i for i, b in enumerate(cfg.layers) if b.type == "route" and b["groups"] == 2)
    conv = graph.inputs[route][0]
    half = cfg.layers[conv]["filters"] // 2
    assert graph.origins[route] == tuple(frozenset({(conv, half + k)}) for k in range(half))
    assert all(graph.group(conv, k) == graph.group(conv, k + half) for k in range(half))
    assert graph.group(conv, 0) != graph.group(conv, 1)
    assert graph.chains() == []


def conv(size: int, activation: str, bn: int = 1) -> str:
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters=8\nsize={size}\nstride=1\npad=1\n"
            f"activation={activation}\n")


def test_scale_channels_and_sam_tie_their_inputs():
    text = ("[net]\nwidth=32\nheight=32\nchannels=3\n" + conv(3, "leaky") + "[avgpool]\n"
            + conv(1, "logistic") + "[scale_channels]\nfrom=-3\n" + conv(3, "logistic")
            + "[sam]\nfrom=-2\n")
    graph = ChannelGraph(parse_cfg(text))
    assert graph.chains() == [[0, 2, 4]]
    assert graph.origins[3][5] == frozenset({(0, 5), (2, 5)})
    assert graph.consumers(0) == [2, 4]  # conv 2 reads its average, conv 4 the scaled map


def test_a_conv_without_batch_norm_fixes_its_chain():
    text = ("[net]\nwidth=32\nheight=32\nchannels=3\n" + conv(3, "leaky") + conv(3, "leaky", bn=0)
            + "[shortcut]\nfrom=-2\nactivation=linear\n" + conv(1, "leaky"))
    graph = ChannelGraph(parse_cfg(text))
    assert graph.chains() == [[0, 1]]
    assert graph.fixed_reason(0).startswith("<cfg>:12 [convolutional]: has no batch norm")  # conv 1
    assert graph.fixed_reason(3) is None


def test_grouped_convs_keep_their_channels_and_inputs():
    """A grouped conv's output, and every conv feeding its input, is fixed, with the line named."""
    text = ("[net]\nwidth=32\nheight=32\nchannels=3\n" + conv(3, "leaky")
            + conv(3, "leaky").replace("pad=1\n", "pad=1\ngroups=2\n") + conv(1, "leaky"))
    graph = ChannelGraph(parse_cfg(text))
    assert "feeds the grouped conv at line 12 (groups=2)" in graph.fixed_reason(0)
    assert "a grouped conv (groups=2)" in graph.fixed_reason(1)
    assert graph.fixed_reason(2) is None
