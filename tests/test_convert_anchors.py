"""COCO/VOC converters into the YOLO layout, and k-means anchors written into a cfg."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from models.cfg import parse_cfg, read_cfg, write_cfg
from models.darknet import Darknet
from tests.conftest import REPO
from utils import anchors as anchors_cli
from utils.anchors import anchor_fitness, box_sizes, fit_anchors, write_anchors
from utils.convert import convert_coco, convert_voc
from utils.datasets import load_labels, read_data_file
from utils.errors import UserError


def images(folder, names, w=200, h=100):
    folder.mkdir()
    for n in names:
        cv2.imwrite(str(folder / n), np.zeros((h, w, 3), np.uint8))


def ann(i, image, cat, bbox, crowd=0):
    return {"id": i, "image_id": image, "category_id": cat, "bbox": bbox, "iscrowd": crowd}


def test_coco_to_yolo(tmp_path):
    images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
                       {"id": 2, "file_name": "b.jpg", "width": 200, "height": 100},
                       {"id": 3, "file_name": "gone.jpg", "width": 200, "height": 100}],
            "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
            "annotations": [ann(1, 1, 18, [20, 10, 40, 30]), ann(2, 1, 3, [0, 0, 10, 10], crowd=1),
                            ann(3, 2, 3, [190, 50, 30, 20]), ann(4, 2, 3, [5, 5, 0, 10])]}
    js = tmp_path / "inst.json"
    js.write_text(json.dumps(coco))
    data_file, report = convert_coco(js, tmp_path / "imgs", tmp_path / "out")
    assert (report.images, report.boxes, report.crowd_skipped, report.bad_boxes_skipped,
            report.missing_images) == (2, 2, 1, 1, 1)
    out = tmp_path / "out"
    assert (out / "labels" / "train" / "a.txt").read_text() == "1 0.200000 0.250000 0.200000 0.300000\n"
    # clipped at the right edge: x 190..200
    assert (out / "labels" / "train" / "b.txt").read_text() == "0 0.975000 0.600000 0.050000 0.200000\n"
    data = read_data_file(data_file)
    assert data.names == ["car", "dog"] and data.classes == 2
    assert len(load_labels(data.train, data.classes).images) == 2
    convert_coco(js, tmp_path / "imgs", out, split="val")
    data = read_data_file(data_file)
    assert data.train.name == "train.txt" and data.valid.name == "val.txt"
    with pytest.raises(UserError, match=r"a\.txt: exists"):
        convert_coco(js, tmp_path / "imgs", out)
    assert (tmp_path / "imgs" / "a.jpg").is_file()  # inputs untouched


def test_voc_to_yolo(tmp_path):
    images(tmp_path / "JPEGImages", ["x.jpg"])
    (tmp_path / "Ann").mkdir()
    (tmp_path / "Ann" / "x.xml").write_text(
        "<annotation><filename>x.jpg</filename><size><width>200</width><height>100</height></size>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>11</xmin><ymin>21</ymin>"
        "<xmax>50</xmax><ymax>60</ymax></bndbox></object>"
        "<object><name>ant</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>200</xmax><ymax>100</ymax>"
        "</bndbox></object></annotation>")
    data_file, report = convert_voc(tmp_path / "Ann", tmp_path / "JPEGImages", tmp_path / "out")
    assert report.boxes == 2 and report.difficult == 1
    rows = (tmp_path / "out" / "labels" / "train" / "x.txt").read_text().splitlines()
    assert rows == ["1 0.150000 0.400000 0.200000 0.400000", "0 0.500000 0.500000 1.000000 1.000000"]
    assert read_data_file(data_file).names == ["ant", "cat"]
    with pytest.raises(UserError, match=r"x\.xml: class 'cat'"):
        convert_voc(tmp_path / "Ann", tmp_path / "JPEGImages", tmp_path / "out2", names=["ant"])
    (tmp_path / "Ann" / "bad.xml").write_text("<annotation><size>")
    with pytest.raises(UserError, match=r"bad\.xml"):
        convert_voc(tmp_path / "Ann", tmp_path / "JPEGImages", tmp_path / "out3")


def test_kmeans_recovers_clusters_and_beats_bad_anchors():
    rng = np.random.default_rng(0)
    truth = np.array([[10, 14], [40, 30], [120, 90]], float)
    wh = np.concatenate([t * rng.normal(1, 0.05, (300, 2)) for t in truth])
    fitted, metrics = fit_anchors(wh, 3)
    np.testing.assert_allclose(fitted, truth, rtol=0.1)
    assert metrics["bpr"] == 1.0
    bad = anchor_fitness(wh, np.array([[300, 300], [310, 310], [320, 320]], float))
    assert metrics["fitness"] > bad["fitness"] + 0.3


def test_box_sizes_scale_the_long_side():
    wh = box_sizes(np.array([[400, 200]]), [np.array([[0, 0.5, 0.5, 0.5, 0.5]])], 200)
    np.testing.assert_allclose(wh, [[100, 50]])


def test_write_anchors_round_trips_and_assigns_masks_by_stride():
    cfg = read_cfg(REPO / "cfg" / "yolov3-tiny.cfg")
    new = write_anchors(cfg, np.array([[5, 5], [10, 10], [20, 20], [40, 40]]), 416)
    again = parse_cfg(write_cfg(new), "round trip")
    model = Darknet(again)
    strides = model.strides(416)
    heads = model.yolo_heads
    fine = heads[int(np.argmin(strides))]
    coarse = heads[int(np.argmax(strides))]
    assert fine.anchors.tolist() == [[5, 5], [10, 10]] and coarse.anchors.tolist() == [[20, 20], [40, 40]]
    model.eval()(torch.rand(1, 3, 64, 64))


def test_anchor_cli_writes_a_cfg(shapes_data, tmp_path, capsys):
    out = anchors_cli.main(["--data", str(shapes_data), "--cfg", str(REPO / "cfg" / "yolo-small.cfg"),
                            "--img-size", "64", "--out", str(tmp_path / "a.cfg")])
    text = capsys.readouterr().out
    assert "cfg anchors" in text and "fitted anchors" in text
    assert len(Darknet(out).yolo_heads[0].anchors) == 3
