"""k-means anchors: metrics, recovery of known clusters, cfg writing with masks by stride, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cfg import parse_cfg, read_cfg, write_cfg
from models.darknet import Darknet
from tests.conftest import REPO
from utils import anchors as anchors_module
from utils.anchors import anchor_fitness, box_sizes, fit_anchors, main, usable_boxes, write_anchors
from utils.cli import run_cli
from utils.datasets import split_labels
from utils.errors import UserError

TRUTH = np.array([[10, 14], [40, 30], [120, 90]], float)


def clustered(n_per=300, seed=0, spread=0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([t * rng.normal(1, spread, (n_per, 2)) for t in TRUTH])


def test_metrics_by_hand():
    # box 1 matches the anchor exactly (1.0); box 2 is 4x wider: min(1/4, 1/2) = 0.25, not above 1/4
    m = anchor_fitness(np.array([[10, 10], [40, 20]]), np.array([[10, 10]]), thr=4.0)
    assert m == {"fitness": 0.5, "bpr": 0.5, "anchors_above_thr": 0.5}
    m = anchor_fitness(np.array([[10, 10], [40, 20]]), np.array([[10, 10], [20, 20]]), thr=4.0)
    # box 2 vs (20, 20): min(2, 1/2, 1, 1) = 0.5 -> counted; box 1 vs (20, 20): 0.5 -> above too
    assert m == {"fitness": 0.75, "bpr": 1.0, "anchors_above_thr": 1.5}


def test_kmeans_recovers_known_clusters():
    fitted, metrics = fit_anchors(clustered(), 3)
    np.testing.assert_allclose(fitted, TRUTH, rtol=0.05)  # sorted by area like the truth
    assert metrics["bpr"] == 1.0 and metrics["fitness"] > 0.9 and metrics["dropped_small"] == 0


def test_fitted_anchors_beat_bad_ones_and_the_search_only_improves():
    wh = np.exp(np.random.default_rng(1).normal(3, 0.8, (2000, 2)))
    fitted, metrics = fit_anchors(wh, 6)
    bad = anchor_fitness(wh, np.full((6, 2), 300.0) + np.arange(6)[:, None] * 10)
    assert metrics["fitness"] > bad["fitness"] + 0.3
    kmeans_only, m0 = fit_anchors(wh, 6, generations=0)
    assert metrics["fitness"] >= m0["fitness"]
    assert not np.allclose(fitted, kmeans_only)  # the mutation search did change something


def test_fit_is_repeatable_and_drops_tiny_boxes():
    wh = np.concatenate([clustered(), np.full((7, 2), 1.5), [[1.0, 30.0]]])
    a, m = fit_anchors(wh, 3, seed=3)
    b, _ = fit_anchors(wh, 3, seed=3)
    np.testing.assert_array_equal(a, b)
    assert m["dropped_small"] == 8
    assert m == {**anchor_fitness(clustered(), a), "dropped_small": 8}  # metrics over the kept boxes


def test_large_sets_are_fitted_on_a_sample_but_measured_on_all(monkeypatch):
    wh = clustered()
    on_all, _ = fit_anchors(wh, 3)
    monkeypatch.setattr(anchors_module, "FIT_SAMPLE", 60)
    fitted, metrics = fit_anchors(wh, 3)
    np.testing.assert_allclose(fitted, TRUTH, rtol=0.1)
    assert not np.allclose(fitted, on_all)  # the search did run on the 60-box sample
    assert metrics == {**anchor_fitness(wh, fitted), "dropped_small": 0}


def test_fit_refuses_too_few_boxes():
    with pytest.raises(UserError, match=r"only 2 boxes of at least 2 px \(1 smaller ones dropped\)"):
        fit_anchors(np.array([[5, 5], [6, 6], [1, 1]]), 3)
    with pytest.raises(UserError, match="at least 1"):
        fit_anchors(clustered(), 0)


def test_box_sizes_scale_the_long_side():
    shapes = np.array([[400, 200], [100, 300], [50, 50]])
    labels = [np.array([[0, 0.5, 0.5, 0.5, 0.5], [1, 0.5, 0.5, 0.1, 1.0]]),
              np.array([[2, 0.5, 0.5, 0.3, 0.2]]), np.zeros((0, 5))]
    wh = box_sizes(shapes, labels, 200)
    # 400x200 -> 200x100; 100x300 -> 66.7x200
    np.testing.assert_allclose(wh, [[100, 50], [20, 100], [20, 40]])


def test_write_anchors_keeps_masks_when_the_count_matches():
    cfg = read_cfg(REPO / "cfg" / "yolo-small.cfg")
    new_anchors = np.array([[60.4, 50], [5, 8], [20, 30.6], [12, 14], [100, 90], [200, 210]])  # unsorted
    new = write_anchors(cfg, new_anchors)
    again = parse_cfg(write_cfg(new), "round trip")
    expected = [5, 8, 12, 14, 20, 31, 60, 50, 100, 90, 200, 210]  # rounded, ascending area
    for i in again.heads:
        assert again.layers[i]["anchors"] == expected and again.layers[i]["num"] == 6
        assert again.layers[i]["mask"] == cfg.layers[i]["mask"]
    assert read_cfg(REPO / "cfg" / "yolo-small.cfg") == cfg  # the input is not modified
    model = Darknet(again).eval()
    dets, raw = model(torch.rand(1, 3, 64, 64))
    coarse = model.yolo_heads[int(np.argmax(model.strides(64)))]
    assert coarse.anchors.tolist() == [[60, 50], [100, 90], [200, 210]]
    assert dets.shape[1] == sum(r.shape[1] * r.shape[2] * r.shape[3] for r in raw)


def test_write_anchors_splits_by_stride_for_yolov3_tiny():
    cfg = read_cfg(REPO / "cfg" / "yolov3-tiny.cfg")  # first head coarse (stride 32), second fine (16)
    new = parse_cfg(write_cfg(write_anchors(cfg, np.array([[40, 40], [5, 5], [20, 20], [10, 10]]), 416)))
    model = Darknet(new).eval()
    _, raw = model(torch.rand(1, 3, 64, 64))
    sizes = [r.shape[2] for r in raw]  # feature-map heights: the fine head has the larger map
    fine, coarse = model.yolo_heads[int(np.argmax(sizes))], model.yolo_heads[int(np.argmin(sizes))]
    assert fine.anchors.tolist() == [[5, 5], [10, 10]] and coarse.anchors.tolist() == [[20, 20], [40, 40]]
    assert [r.shape[1] for r in raw] == [2, 2]
    assert all(new.layers[i - 1]["filters"] == 2 * (5 + 80) for i in new.heads)  # head convs resized


@pytest.mark.parametrize("name, head_strides", [("yolov3", (32, 16, 8)), ("yolov4", (8, 16, 32))])
def test_masks_follow_strides_not_head_order(name, head_strides):
    cfg = read_cfg(REPO / "cfg" / f"{name}.cfg")
    new = write_anchors(cfg, np.arange(1, 13).repeat(2).reshape(12, 2) * 5)  # 12 anchors -> 4 per head
    by_stride = {8: [0, 1, 2, 3], 16: [4, 5, 6, 7], 32: [8, 9, 10, 11]}
    assert [new.layers[i]["mask"] for i in new.heads] == [by_stride[s] for s in head_strides]


def test_write_anchors_refuses_bad_anchors():
    cfg = read_cfg(REPO / "cfg" / "yolov3-tiny.cfg")
    with pytest.raises(UserError, match="1 anchors cannot be shared by 2 heads"):
        write_anchors(cfg, np.array([[10, 10]]))
    with pytest.raises(UserError, match="must be positive"):
        write_anchors(cfg, np.array([[10, -1], [3, 3]]))


def test_cli_compares_and_writes_a_cfg(shapes_data, tmp_path, capsys):
    cfg_path = REPO / "cfg" / "yolo-small.cfg"
    before = cfg_path.read_bytes()
    out = main(["--data", str(shapes_data), "--cfg", str(cfg_path), "--img-size", "64", "--n", "4",
                "--generations", "50", "--out", str(tmp_path / "a.cfg")])
    text = capsys.readouterr().out
    lines = {ln.split(":")[0]: ln for ln in text.splitlines()}
    assert "fitness" in lines["cfg anchors"] and "bpr" in lines["fitted anchors"]
    assert cfg_path.read_bytes() == before
    new = read_cfg(out)
    anchors = np.array(new.layers[new.heads[0]]["anchors"], float).reshape(-1, 2)
    assert len(anchors) == 4 and [len(new.layers[i]["mask"]) for i in new.heads] == [2, 2]
    shapes, labels = split_labels(shapes_data, "train")
    wh, _ = usable_boxes(box_sizes(shapes, labels, 64))
    old = np.array(read_cfg(cfg_path).layers[new.heads[0]]["anchors"], float).reshape(-1, 2)
    assert anchor_fitness(wh, anchors)["fitness"] >= anchor_fitness(wh, old)["fitness"]
    assert f"{anchor_fitness(wh, anchors)['fitness']:.4f}" in lines["fitted anchors"]
    Darknet(new).eval()(torch.rand(1, 3, 64, 64))


def test_cli_errors(shapes_data, tmp_path, capsys):
    cfg = str(REPO / "cfg" / "yolo-small.cfg")
    assert run_cli(main, ["--data", str(tmp_path / "no.data"), "--cfg", cfg]) == 2
    assert "no.data: .data file not found" in capsys.readouterr().err
    assert run_cli(main, ["--data", str(shapes_data), "--cfg", cfg, "--thr", "0.5"]) == 2
    assert "argument --thr: 0.5 is not a number in (1, 1000]" in capsys.readouterr().err
    assert run_cli(main, ["--data", str(shapes_data), "--cfg", cfg, "--n", "500"]) == 2
    assert "shapes.data: the train split has" in capsys.readouterr().err
