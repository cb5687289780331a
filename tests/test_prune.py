"""The pruning engine and its six methods: exactness, compensation, safety, OpenCV parity, scripts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from models.darknet import Darknet
from models.graph import ChannelGraph
from models.io import load_checkpoint, load_model
from prune import cli
from prune.blocks import residual_blocks
from prune.engine import prune_channels, remove_blocks
from prune.methods import METHODS, apply_plan, plan
from prune.policies import channel_plan, lowest_blocks
from tests.conftest import REPO, rel_err, tame_model
from tests.test_opencv_parity import assert_matches_opencv
from utils.errors import UserError

CFG_NAMES = ["yolo-small", "yolov3", "yolov3-spp", "yolov3-tiny", "yolov4", "yolov4-tiny"]
RESIDUAL = {"yolo-small", "yolov3", "yolov3-spp", "yolov4"}
CHANNEL_ONLY = [m for m, spec in METHODS.items() if not spec.blocks]
CASES = [(c, m) for c in CFG_NAMES for m in METHODS if not METHODS[m].blocks or c in RESIDUAL]


def cfg_file(name: str):
    return REPO / "cfg" / f"{name}.cfg"


def heads(model: Darknet, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x)[1]


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(rel_err(p.numpy(), q.numpy()) for p, q in zip(a, b))


def spread_gammas(model: Darknet, seed: int = 0) -> Darknet:
    """Distinct γ in [0.3, 0.7] so the thresholds of every method cut somewhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.3)
    return model


def method_prune(model: Darknet, method: str, removed: str | None, percent: float = 0.5,
                 compensate: bool = True) -> Darknet:
    """Prune ``model`` with ``method``. First, on everything it removes, ``removed="zero"`` sets
    γ = β = 0 and ``removed="small"`` scales γ by 0.01 (β stays: nearly constant act(β) outputs). Widths
    are not rounded (regular keeps its 8), so the exactness tests see odd widths."""
    p = plan(model, method, percent, round_to=None if method == "regular" else 1, shortcuts=2)
    if removed:
        beta = 0.0 if removed == "zero" else 1.0
        gamma = 0.0 if removed == "zero" else 0.01
        with torch.no_grad():
            for i, keep in (p.channels.masks.items() if p.channels else []):
                bn = model.layers[i].bn
                bn.weight[~keep] *= gamma
                bn.bias[~keep] *= beta
            for b in p.blocks:  # the branch's last conv outputs about act(β), act(0) = 0 with "zero"
                bn = model.layers[b.convs[-1]].bn
                bn.weight.mul_(gamma)
                bn.bias.mul_(beta)
    return apply_plan(model, p, compensate)


@pytest.fixture(scope="module")
def spread_models():
    cache = {}

    def get(name: str) -> Darknet:
        if name not in cache:
            cache[name] = spread_gammas(tame_model(cfg_file(name)))
        model = Darknet(cache[name].cfg)
        model.load_state_dict(cache[name].state_dict())
        return model.eval()
    return get


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("name,method", CASES, ids=[f"{c}-{m}" for c, m in CASES])
def test_removing_zero_channels_changes_nothing(spread_models, name, method):
    model = spread_models(name)
    pruned = method_prune(model, method, "zero")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    err = worst(heads(pruned, x), heads(model, x))
    print(f"{name} {method}: relative error {err:.1e}")
    assert err < 1e-5
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    assert n1 < n0  # the model really is smaller
    if method in ("layer", "layer_channel"):
        assert len(pruned.cfg.layers) == len(model.cfg.layers) - sum(
            len(b.layers) for b in lowest_blocks(model, 2))


@pytest.mark.parametrize("method", ["normal", "slim", "layer"])
def test_compensation_beats_dropping_the_constant(spread_models, method):
    """With β ≠ 0 on what is removed, folding act(β) into the consumers is closer than not."""
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    err = {}
    for compensate in (True, False):
        model = spread_models("yolo-small")
        pruned = method_prune(model, method, "small", compensate=compensate)
        err[compensate] = worst(heads(pruned, x), heads(model, x))
    print(f"{method}: relative error compensated {err[True]:.2e}, uncompensated {err[False]:.2e}")
    assert err[True] < 0.5 * err[False]


def test_one_by_one_consumers_are_folded_exactly():
    """A removed channel feeding only a 1x1 conv (no zero padding) is compensated exactly."""
    text = ("[net]\nwidth=32\nheight=32\nchannels=3\n"
            "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n"
            "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=1\nstride=1\npad=1\nactivation=leaky\n"
            "[convolutional]\nfilters=18\nsize=1\nstride=1\npad=1\nactivation=linear\n"
            "[yolo]\nmask=0,1,2\nanchors=10,14,23,27,37,58\nclasses=1\nnum=3\n")
    from models.cfg import parse_cfg
    from utils.torch_utils import tame_random_weights

    model = tame_random_weights(Darknet(parse_cfg(text)), img_size=32)
    with torch.no_grad():
        model.layers[0].bn.weight[:3] = 0  # constant act(β) channels, β ≠ 0
    x = torch.rand(1, 3, 32, 32)
    masks = {0: torch.tensor([False] * 3 + [True] * 5)}
    assert worst(heads(prune_channels(model, masks), x), heads(model, x)) < 1e-5
    assert worst(heads(prune_channels(model, masks, compensate=False), x), heads(model, x)) > 1e-3


# ---------------------------------------------------------------- masks and safety
def test_masks_that_break_the_network_are_refused(spread_models):
    model = spread_models("yolov3")
    graph = ChannelGraph(model.cfg)
    a = graph.chains()[0][0]
    width = model.cfg.layers[a]["filters"]
    half = torch.arange(width) < width // 2
    with pytest.raises(UserError, match="tied to channel"):
        prune_channels(model, {a: half})  # conv b keeps the channels a removes
    head_conv = model.cfg.heads[0] - 1
    with pytest.raises(UserError, match=r"feeds the \[yolo\] head.*cannot be removed"):
        prune_channels(model, {head_conv: torch.arange(model.cfg.layers[head_conv]["filters"]) > 0})
    with pytest.raises(UserError, match="removes all"):
        prune_channels(model, {0: torch.zeros(model.cfg.layers[0]["filters"], dtype=torch.bool)})


@pytest.mark.parametrize("method", CHANNEL_ONLY)
def test_a_percent_too_high_keeps_a_floor_in_every_layer(spread_models, method):
    model = spread_models("yolov4-tiny")
    plan = channel_plan(model, METHODS[method], 0.999, layer_keep=0.1)
    assert plan.safe_percent < 0.999 and plan.floored
    for keep in plan.masks.values():
        assert keep.sum() >= 0.1 * keep.numel()
    pruned = prune_channels(model, plan.masks)
    assert heads(pruned, torch.rand(1, 3, 64, 64))[0].isfinite().all()
    assert "largest percent" in plan.summary()


def test_regular_widths_are_multiples_of_round_to(spread_models):
    model = spread_models("yolov3-tiny")
    plan = channel_plan(model, METHODS["regular"], 0.6)  # regular's default --round-to: 8
    for keep in plan.masks.values():
        kept = int(keep.sum())
        assert kept % 8 == 0 or kept == keep.numel()


@pytest.mark.parametrize("cfg,name", [(c, m) for c in ("yolov3", "yolov4-tiny") for m in METHODS
                                      if METHODS[m].channels])
def test_every_channel_method_rounds_kept_widths_with_round_to(spread_models, cfg, name):
    """--round-to R keeps, in every pruned conv (tied chains and grouped-route splits too), a multiple of
    R channels or all of them, and never fewer channels than the unrounded plan."""
    model = spread_models(cfg)
    plain = channel_plan(model, METHODS[name], 0.6, round_to=1)
    rounded = channel_plan(model, METHODS[name], 0.6, round_to=8)
    assert any(int(k.sum()) % 8 for k in plain.masks.values())  # without rounding, odd widths exist
    for conv, keep in rounded.masks.items():
        kept = int(keep.sum())
        assert kept % 8 == 0 or kept == keep.numel(), (conv, kept)
        assert (keep | plain.masks[conv]).equal(keep)  # the rounded plan keeps what the plain one keeps
    pruned = prune_channels(model, rounded.masks)
    assert heads(pruned, torch.rand(1, 3, 64, 64))[0].isfinite().all()


def test_shortcut_method_follows_the_first_conv_of_each_chain(spread_models):
    model = spread_models("yolov3")
    graph = ChannelGraph(model.cfg)
    plan = channel_plan(model, METHODS["shortcut"], 0.5, round_to=1)
    for chain in graph.chains():
        first = plan.masks[chain[0]]
        assert all(torch.equal(plan.masks[c], first) for c in chain[1:])
        gamma = model.layers[chain[0]].bn.weight.abs()
        assert gamma[first].min() > gamma[~first].max() if (~first).any() else True


def test_slim_keeps_the_union_over_a_chain(spread_models):
    model = spread_models("yolov3")
    graph = ChannelGraph(model.cfg)
    plan = channel_plan(model, METHODS["slim"], 0.5, round_to=1)  # the rule itself, without rounding
    chain = graph.chains()[2]
    above = torch.stack([model.layers[c].bn.weight.abs() > plan.threshold for c in chain]).any(0)
    assert torch.equal(plan.masks[chain[0]], above)


def test_layer_pruning_needs_residual_blocks(spread_models):
    with pytest.raises(UserError, match="no residual block"):
        lowest_blocks(spread_models("yolov3-tiny"), 1)
    model = spread_models("yolo-small")
    n = len(residual_blocks(model.cfg))
    with pytest.raises(UserError, match=f"has {n} removable residual blocks"):
        lowest_blocks(model, n + 1)


def test_layer_pruning_renumbers_routes(spread_models):
    """yolov3: removing the blocks ending at shortcut 4 (source 1) and 36 (source 33) moves the
    route targets 61 -> 55 and 36 -> 30 (the source of the removed block takes its place)."""
    model = spread_models("yolov3")
    blocks = [b for b in residual_blocks(model.cfg) if b.shortcut in (4, 36)]
    pruned = remove_blocks(model, blocks)
    routes = [b["layers"] for b in model.cfg.layers if b.type == "route"]
    new_routes = [b["layers"] for b in pruned.cfg.layers if b.type == "route"]
    assert routes == [[-4], [-1, 61], [-4], [-1, 36]]
    assert new_routes == [[-4], [-1, 55], [-4], [-1, 30]]
    assert len(pruned.cfg.layers) == len(model.cfg.layers) - 6


# ---------------------------------------------------------------- OpenCV reads what we write
@pytest.mark.opencv
@pytest.mark.parametrize("name,method", CASES, ids=[f"{c}-{m}" for c, m in CASES])
def test_pruned_models_match_opencv(spread_models, name, method, tmp_path):
    pruned = method_prune(spread_models(name), method, None)
    assert_matches_opencv(pruned, tmp_path)


# ---------------------------------------------------------------- the scripts
@pytest.fixture(scope="module")
def trained_small(shapes_data, tmp_path_factory):
    """A yolo-small checkpoint after one tiny sparse-training epoch."""
    from stages.train import trainer
    from tests.test_train import tiny_opts

    project = tmp_path_factory.mktemp("sparse")
    trainer(tiny_opts(shapes_data, project, epochs=1, sr=True, s=0.01, prune=1)).fit()
    return project / "exp" / "weights" / "last.pt"


def test_script_writes_a_smaller_model_that_every_script_reads(trained_small, shapes_data, tmp_path):
    out = tmp_path / "slim"
    proc = subprocess.run([sys.executable, str(REPO / "prune" / "slim_prune.py"), "--weights",
                           str(trained_small), "--data", str(shapes_data), "--percent", "0.6",
                           "--img-size", "64", "--recalibrate", "1", "--batch-size", "4",
                           "--latency-runs", "2", "--output", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "after/before" in proc.stdout and "mAP@0.5" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["map50"] is not None
    # the checkpoint alone is enough, and the darknet pair describes the same model
    from_pt = load_model(out / "pruned.pt")
    from_darknet = load_model(out / "pruned.weights", out / "pruned.cfg")
    x = torch.rand(1, 3, 64, 64)
    assert worst(heads(from_darknet, x), heads(from_pt, x)) < 1e-6
    assert load_checkpoint(out / "pruned.pt")["meta"]["prune"]["method"] == "slim"
    # fine-tuning keeps the pruned architecture (the cfg inside the .pt), test.py evaluates it
    import test as test_script
    from stages.train import trainer
    from tests.test_train import tiny_opts

    trainer(tiny_opts(shapes_data, tmp_path / "ft", epochs=1, weights=str(out / "pruned.pt"))).fit()
    tuned = load_model(tmp_path / "ft" / "exp" / "weights" / "last.pt")
    assert tuned.cfg_text == from_pt.cfg_text
    r = test_script.main(["--weights", str(out / "pruned.pt"), "--data", str(shapes_data), "--img-size",
                          "64", "--project", str(tmp_path / "test"), "--workers", "0"])
    assert r.n_images == 4 and r.map50 == pytest.approx(report["after"]["map50"], abs=1e-9)


@pytest.mark.parametrize("method", ["normal", "shortcut", "regular", "layer", "layer_channel"])
def test_every_method_script_runs(trained_small, tmp_path, method):
    args = ["--weights", str(trained_small), "--img-size", "64", "--latency-runs", "1",
            "--output", str(tmp_path)]
    if method in ("layer", "layer_channel"):
        args += ["--shortcuts", "1"]
    report = cli.main(method, args)
    assert report["after"]["params"] < report["before"]["params"]
    assert (tmp_path / "pruned.cfg").is_file() and (tmp_path / "pruned.weights").is_file()


def test_scripts_never_write_over_their_input(trained_small, tmp_path):
    import shutil

    src = tmp_path / "pruned.pt"
    shutil.copy(trained_small, src)
    before = src.read_bytes()
    with pytest.raises(UserError, match="would overwrite the input"):
        cli.main("normal", ["--weights", str(src), "--output", str(tmp_path)])
    assert src.read_bytes() == before
    with pytest.raises(UserError, match="--recalibrate needs --data"):
        cli.main("normal", ["--weights", str(src), "--recalibrate", "2", "--output", str(tmp_path / "x")])


def small_cfg(body: str):
    from models.cfg import parse_cfg

    head = ("[convolutional]\nfilters=18\nsize=1\nstride=1\npad=1\nactivation=linear\n"
            "[yolo]\nmask=0,1,2\nanchors=10,14,23,27,37,58\nclasses=1\nnum=3\n")
    return parse_cfg("[net]\nwidth=32\nheight=32\nchannels=3\n" + body + head)


def conv8(size: int = 3) -> str:
    return f"[convolutional]\nbatch_normalize=1\nfilters=8\nsize={size}\nstride=1\npad=1\nactivation=leaky\n"


def test_kept_channels_of_a_logistic_shortcut_lack_nothing():
    """logistic(0) = 0.5: the activation of a combining layer applies only to removed channels."""
    from utils.torch_utils import tame_random_weights

    cfg = small_cfg(conv8() + conv8() + conv8() + "[shortcut]\nfrom=-2\nactivation=logistic\n" + conv8(1))
    model = tame_random_weights(Darknet(cfg), img_size=32)
    x = torch.rand(1, 3, 32, 32)
    assert worst(heads(prune_channels(model, {}), x), heads(model, x)) < 1e-6
    with torch.no_grad():
        model.layers[0].bn.weight[:4] = 0
        model.layers[0].bn.bias[:4] = 0
    masks = {0: torch.arange(8) >= 4}  # conv 0 feeds only conv 1, outside the shortcut's tie
    assert worst(heads(prune_channels(model, masks), x), heads(model, x)) < 1e-5


def test_nested_residual_blocks_are_not_removed_together(spread_models):
    cfg = small_cfg(conv8() + conv8() + conv8() + "[shortcut]\nfrom=-2\nactivation=linear\n"
                    + "[shortcut]\nfrom=-4\nactivation=linear\n")
    model = spread_gammas(Darknet(cfg))
    assert [(b.source, b.shortcut) for b in residual_blocks(cfg)] == [(1, 3), (0, 4)]
    assert len(lowest_blocks(model, 1)) == 1
    with pytest.raises(UserError, match="nested; at most 1"):
        lowest_blocks(model, 2)


# ---------------------------------------------------------------- widths from a cfg
def narrower(model: Darknet, method: str, share: float = 0.4):
    """``model``'s cfg with every unit ``method`` may cut at ``share`` of its channel groups (a conv that
    a grouped [route] splits keeps whole groups)."""
    from prune.policies import channel_units

    target = model.cfg.copy()
    target.source = "cut.cfg"
    graph = ChannelGraph(model.cfg)
    for unit in channel_units(graph, METHODS[method].channel_convs(graph)):
        for i in {i for i, _ in unit[0]}:
            per = sum(1 for j, _ in unit[0] if j == i)
            target.layers[i].set("filters", per * max(1, int(share * len(unit))))
    return target


@pytest.mark.parametrize("name,method", [("yolo-small", "slim"), ("yolo-small", "shortcut"),
                                         ("yolo-small", "regular"), ("yolov4-tiny", "slim")])
def test_widths_from_a_cfg_keep_the_best_groups_at_exactly_its_widths(spread_models, name, method):
    from prune.policies import channel_units, group_score

    model = spread_models(name)
    target = narrower(model, method)
    p = plan(model, method, widths=target)
    pruned = apply_plan(model, p)
    assert [b["filters"] for b in pruned.cfg.layers if b.type == "convolutional"] == \
        [b["filters"] for b in target.layers if b.type == "convolutional"]
    assert "widths of cut.cfg" in p.channels.summary()
    graph = ChannelGraph(model.cfg)

    def score(chans):
        return group_score(torch.stack([model.layers[i].bn.weight.abs()[c] for i, c in chans]),
                           METHODS[method].group_score)

    for unit in channel_units(graph, METHODS[method].channel_convs(graph)):
        kept = [score(chans) for chans in unit if p.channels.masks[chans[0][0]][chans[0][1]]]
        gone = [score(chans) for chans in unit if not p.channels.masks[chans[0][0]][chans[0][1]]]
        assert len(kept) == max(1, int(0.4 * len(unit))) and min(kept) >= max(gone)


def test_widths_from_a_cfg_that_is_no_cut_of_the_model_are_one_line_errors(spread_models):
    model = spread_models("yolo-small")
    other = load_model(cfg=cfg_file("yolov3-tiny")).cfg
    with pytest.raises(UserError, match="not a cut of this network"):
        plan(model, "slim", widths=other)
    wider = narrower(model, "slim", 2.0)
    with pytest.raises(UserError, match="a cut of this conv keeps 1 to"):
        plan(model, "slim", widths=wider)
    untied = narrower(model, "slim")
    chain = ChannelGraph(model.cfg).chains()[0]
    untied.layers[chain[-1]].set("filters", untied.layers[chain[0]]["filters"] + 1)
    with pytest.raises(UserError, match="tied convs keep one width"):
        plan(model, "slim", widths=untied)
    resized = narrower(model, "slim")
    resized.layers[chain[0]].set("size", 1)
    with pytest.raises(UserError, match=r"size=1, .* has 3: a cut for slim pruning changes only filters"):
        plan(model, "slim", widths=resized)
    tied_cut = narrower(model, "slim")  # normal pruning does not cut the shortcut-tied convs
    with pytest.raises(UserError, match="normal pruning does not cut this conv"):
        plan(model, "normal", widths=tied_cut)
    with pytest.raises(UserError, match="layer pruning removes blocks"):
        plan(model, "layer", widths=tied_cut)
    with pytest.raises(UserError, match="layer_channel pruning removes blocks"):
        plan(model, "layer_channel", widths=tied_cut)
    grouped = spread_models("yolov4-tiny")  # its grouped [route]s split convs into halves
    odd = narrower(grouped, "slim")
    split = next(i for i, b in enumerate(odd.layers) if b.type == "convolutional"
                 and b["filters"] != grouped.cfg.layers[i]["filters"] and b["filters"] % 2 == 0
                 and i + 1 < len(odd.layers) and odd.layers[i + 1].type == "route"
                 and odd.layers[i + 1]["groups"] > 1)
    odd.layers[split].set("filters", odd.layers[split]["filters"] + 1)
    with pytest.raises(UserError, match=r"in steps of 2 \(a grouped \[route\] splits it\)"):
        plan(grouped, "slim", widths=odd)


def test_the_widths_from_flag_prunes_to_a_cfg_file_and_never_writes_it(trained_small, tmp_path):
    from models.cfg import write_cfg

    model = load_model(trained_small)
    cut = tmp_path / "cut.cfg"
    cut.write_text(write_cfg(narrower(model, "slim", 0.5)))
    common = ["--weights", str(trained_small), "--img-size", "64", "--latency-runs", "1"]
    report = cli.main("slim", [*common, "--widths-from", str(cut), "--output", str(tmp_path / "out")])
    wanted = [b["filters"] for b in narrower(model, "slim", 0.5).layers if b.type == "convolutional"]
    assert [w[1] for w in report["widths"].values()] == wanted
    pruned = load_model(tmp_path / "out" / "pruned.pt").cfg
    assert [b["filters"] for b in pruned.layers if b.type == "convolutional"] == wanted
    with pytest.raises(UserError, match="--percent: does nothing with --widths-from"):
        cli.main("slim", [*common, "--widths-from", str(cut), "--percent", "0.3",
                          "--output", str(tmp_path / "x")])
    mine = tmp_path / "mine"  # the cut is named like an output: refused before anything is written
    mine.mkdir()
    (mine / "pruned.cfg").write_text(cut.read_text())
    with pytest.raises(UserError, match="would overwrite the input"):
        cli.main("slim", [*common, "--widths-from", str(mine / "pruned.cfg"), "--output", str(mine),
                          "--exist-ok"])
    assert (mine / "pruned.cfg").read_text() == cut.read_text() and len(list(mine.iterdir())) == 1
