"""COCO and VOC converters: exact labels, class order, skip counts, the .data file and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.conftest import REPO
from utils.cli import run_cli
from utils.convert import convert_coco, convert_voc, main
from utils.datasets import list_images, load_labels, read_data_file
from utils.errors import UserError


def write_images(folder, names, w=200, h=100):
    """Real images on disk, each a different colour so copies can be told apart."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        cv2.imwrite(str(folder / n), np.full((h, w, 3), 10 * i, np.uint8))


def ann(i, image, cat, bbox, crowd=0):
    return {"id": i, "image_id": image, "category_id": cat, "bbox": bbox, "iscrowd": crowd}


def coco_file(path, images, anns, cats=({"id": 18, "name": "dog"}, {"id": 3, "name": "car"})):
    path.write_text(json.dumps({"images": images, "categories": list(cats), "annotations": anns}))
    return path


def img(i, name, w=200, h=100):
    return {"id": i, "file_name": name, "width": w, "height": h}


@pytest.fixture
def coco(tmp_path):
    """Two images on disk, one listed but missing; a crowd box, a zero-size box and a clipped one."""
    write_images(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
    js = coco_file(tmp_path / "inst.json",
                   [img(1, "a.jpg"), img(2, "b.jpg"), img(3, "gone.jpg"), img(4, "c.jpg")],
                   [ann(1, 1, 18, [20, 10, 40, 30]), ann(2, 1, 3, [0, 0, 10, 10], crowd=1),
                    ann(3, 2, 3, [190, 50, 30, 20]), ann(4, 2, 3, [5, 5, 0, 10]),
                    ann(5, 1, 3, [-10, -10, 30, 20])])
    return js, tmp_path / "imgs", tmp_path / "out"


def test_coco_labels_are_exact_and_categories_remapped(coco):
    js, images, out = coco
    json_bytes = js.read_bytes()
    data_file, report = convert_coco(js, images, out)
    assert (report.images, report.boxes, report.crowd_skipped, report.bad_boxes_skipped,
            report.missing_images) == (3, 3, 1, 1, 1)
    # dog (id 18) -> 1, car (id 3) -> 0; cx = (20 + 40/2) / 200 etc.
    assert (out / "labels/train/a.txt").read_text() == ("1 0.200000 0.250000 0.200000 0.300000\n"
                                                        "0 0.050000 0.050000 0.100000 0.100000\n")
    # x 190..220 clipped to 190..200
    assert (out / "labels/train/b.txt").read_text() == "0 0.975000 0.600000 0.050000 0.200000\n"
    assert (out / "labels/train/c.txt").read_text() == ""  # an image without boxes is a background image
    assert (out / "train.txt").read_text().split() == ["images/train/a.jpg", "images/train/b.jpg",
                                                       "images/train/c.jpg"]
    assert (out / "out.names").read_text() == "car\ndog\n"
    for name in ("a.jpg", "b.jpg", "c.jpg"):  # linked or copied, the same bytes; inputs untouched
        assert (out / "images/train" / name).read_bytes() == (images / name).read_bytes()
    assert js.read_bytes() == json_bytes and sorted(p.name for p in images.iterdir()) == ["a.jpg", "b.jpg",
                                                                                          "c.jpg"]
    data = read_data_file(data_file)
    assert (data.classes, data.names) == (2, ["car", "dog"])
    assert data.train == out / "train.txt" and data.valid == out / "train.txt"  # until a val split exists
    labels = load_labels(data.train, data.classes, verbose=False)
    assert labels.shapes.tolist() == [[200, 100]] * 3 and labels.bad_rows == 0
    np.testing.assert_allclose(labels.labels[1], [[0, 0.975, 0.6, 0.05, 0.2]], atol=1e-6)


def test_a_second_split_is_added_to_the_data_file(coco, tmp_path):
    js, images, out = coco
    data_file, _ = convert_coco(js, images, out)
    val_js = coco_file(tmp_path / "val.json", [img(7, "a.jpg")], [ann(1, 7, 3, [0, 0, 100, 50])])
    assert convert_coco(val_js, images, out, split="val")[0] == data_file
    data = read_data_file(data_file)
    assert data.train == out / "train.txt" and data.valid == out / "val.txt"
    assert [p.name for p in list_images(data.valid)] == ["a.jpg"]
    assert (out / "labels/val/a.txt").read_text() == "0 0.250000 0.250000 0.500000 0.500000\n"
    assert (out / "labels/train/a.txt").read_text().startswith("1 0.200000")  # train untouched


def test_the_folder_can_move(coco, tmp_path):
    js, images, out = coco
    convert_coco(js, images, out)
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    data = read_data_file(moved / "out.data")
    assert data.train == moved / "train.txt"
    assert all(p.is_file() for p in list_images(data.train))


def test_rerun_is_refused_without_overwrite(coco):
    js, images, out = coco
    convert_coco(js, images, out)
    label = out / "labels/train/a.txt"
    label.write_text("edited\n")
    with pytest.raises(UserError, match=r"a\.txt: exists; pass --overwrite"):
        convert_coco(js, images, out)
    assert label.read_text() == "edited\n"  # refused before writing anything
    convert_coco(js, images, out, overwrite=True)
    assert label.read_text().startswith("1 0.200000 0.250000")


def test_a_different_image_under_the_same_name_is_refused(coco):
    js, images, out = coco
    (out / "images/train").mkdir(parents=True)
    (out / "images/train/a.jpg").write_bytes(b"someone else's image")
    with pytest.raises(UserError, match=r"a\.jpg: exists and differs"):
        convert_coco(js, images, out)
    assert not (out / "labels").exists()


def test_splits_with_different_classes_are_refused(coco, tmp_path):
    js, images, out = coco
    convert_coco(js, images, out)
    other = coco_file(tmp_path / "v.json", [img(1, "a.jpg")], [], cats=[{"id": 1, "name": "cat"}])
    with pytest.raises(UserError, match=r"out\.names: an earlier split has 2 classes"):
        convert_coco(other, images, out, split="val")
    assert not (out / "labels/val").exists()


def test_images_sharing_a_label_file_are_refused(tmp_path):
    write_images(tmp_path / "imgs", ["a.jpg", "a.png"])
    js = coco_file(tmp_path / "i.json", [img(1, "a.jpg"), img(2, "a.png")], [])
    with pytest.raises(UserError, match=r"share the label file .*a\.txt"):
        convert_coco(js, tmp_path / "imgs", tmp_path / "out")


@pytest.mark.parametrize("content, message", [
    ("{not json", r"bad\.json: not valid JSON"),
    (json.dumps({"images": []}), r"bad\.json: not a COCO instances file .*categories"),
    (json.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}]}), r"bad\.json: .*file_name"),
    (json.dumps({"images": [img(1, "a.jpg")], "categories": [{"id": 1, "name": "a"}],
                 "annotations": [ann(9, 1, 5, [0, 0, 1, 1])]}), r"bad\.json: annotation 9 .*category \(5\)"),
    (json.dumps({"images": [img(1, "a.jpg")], "categories": [{"id": 1, "name": "a"}],
                 "annotations": [ann(9, 2, 1, [0, 0, 1, 1])]}), r"bad\.json: annotation 9 .*image \(2\)"),
    (json.dumps({"images": [img(1, "a.jpg")], "categories": [{"id": 1, "name": "a"}],
                 "annotations": [ann(9, 1, 1, [0, 0, 1])]}), r"bad\.json: annotation 9: bbox needs 4"),
    (json.dumps({"images": [img(1, "a.jpg", w=0)], "categories": [{"id": 1, "name": "a"}]}),
     r"bad\.json: image 1 \(a\.jpg\) has size 0x100"),
    (json.dumps({"images": [img(1, "a.jpg")], "categories": [{"id": i, "name": "a"} for i in (1, 2)]}),
     r"bad\.json: class names repeated: \['a'\]"),
    (json.dumps({"images": [img(1, "a.jpg")], "categories": [{"id": 1, "name": " "}]}),
     r"bad\.json: class names must be non-empty"),
], ids=["not-json", "no-categories", "no-file-name", "unknown-category", "unknown-image", "short-bbox",
        "zero-width", "repeated-name", "empty-name"])
def test_malformed_coco_names_the_file(tmp_path, content, message):
    write_images(tmp_path / "imgs", ["a.jpg"])
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(UserError, match=message):
        convert_coco(tmp_path / "bad.json", tmp_path / "imgs", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_inputs_are_user_errors(coco, tmp_path):
    js, images, out = coco
    with pytest.raises(UserError, match=r"--json .*nope\.json: file not found"):
        convert_coco(tmp_path / "nope.json", images, out)
    with pytest.raises(UserError, match=r"--images .*nodir: folder not found"):
        convert_coco(js, tmp_path / "nodir", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"inst\.json: none of its images were found"):
        convert_coco(js, tmp_path / "empty", out)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- VOC

def voc_xml(filename, objects, size=(200, 100)):
    """``objects``: (name, xmin, ymin, xmax, ymax, difficult)."""
    size_el = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
                   f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                   for n, x1, y1, x2, y2, d in objects)
    return f"<annotation><filename>{filename}</filename>{size_el}{objs}</annotation>"


@pytest.fixture
def voc(tmp_path):
    """A VOC root: x and y in train, z in val; z.xml has no <size> (the image gives it)."""
    root = tmp_path / "VOC"
    write_images(root / "JPEGImages", ["x.jpg", "y.jpg", "z.jpg"])
    ann_dir = root / "Annotations"
    ann_dir.mkdir()
    (ann_dir / "x.xml").write_text(voc_xml("x.jpg", [("cat", 11, 21, 50, 60, 1), ("ant", 1, 1, 200, 100, 0)]))
    (ann_dir / "y.xml").write_text(voc_xml("y.jpg", [("bee", 300, 10, 320, 20, 0)]))  # outside: skipped
    (ann_dir / "z.xml").write_text(voc_xml("z.jpg", [("ant", 101, 51, 200, 100, 0)], size=None))
    (root / "ImageSets/Main").mkdir(parents=True)
    (root / "ImageSets/Main/train.txt").write_text("x\ny\n")
    (root / "ImageSets/Main/val.txt").write_text("z\n")
    return root


def test_voc_labels_are_exact(voc, tmp_path):
    out = tmp_path / "out"
    data_file, report = convert_voc(voc / "Annotations", voc / "JPEGImages", out)
    assert (report.images, report.boxes, report.bad_boxes_skipped, report.difficult) == (3, 3, 1, 1)
    assert (out / "out.names").read_text() == "ant\nbee\ncat\n"  # every name found, sorted
    # VOC pixels are 1-based and inclusive: xmin=11..xmax=50 covers 0-based 10..50
    assert (out / "labels/train/x.txt").read_text().splitlines() == [
        "2 0.150000 0.400000 0.200000 0.400000", "0 0.500000 0.500000 1.000000 1.000000"]
    assert (out / "labels/train/y.txt").read_text() == ""
    assert (out / "labels/train/z.txt").read_text() == "0 0.750000 0.750000 0.500000 0.500000\n"
    assert read_data_file(data_file).names == ["ant", "bee", "cat"]


def test_voc_root_splits_follow_image_sets(voc, tmp_path):
    out = tmp_path / "out"
    _, train = convert_voc(voc, voc / "JPEGImages", out)
    data_file, val = convert_voc(voc, voc / "JPEGImages", out, split="val")
    assert (train.images, val.images) == (2, 1)
    data = read_data_file(data_file)
    assert [p.name for p in list_images(data.train)] == ["x.jpg", "y.jpg"]
    assert [p.name for p in list_images(data.valid)] == ["z.jpg"]
    # val has only 'ant' but keeps train's class order (ant, bee, cat), not a new one
    assert data.names == ["ant", "bee", "cat"] == (out / "out.names").read_text().split()
    assert (out / "labels/val/z.txt").read_text().startswith("0 ")


def test_voc_ids_file_must_name_existing_xml(voc, tmp_path):
    (tmp_path / "ids.txt").write_text("x\nmissing\n")
    with pytest.raises(UserError, match=r"ids\.txt:2: .*missing\.xml not found"):
        convert_voc(voc, voc / "JPEGImages", tmp_path / "out", ids=tmp_path / "ids.txt")


def test_voc_class_outside_the_names_list_names_the_xml(voc, tmp_path):
    with pytest.raises(UserError, match=r"x\.xml: class 'cat' is not in the names list"):
        convert_voc(voc / "Annotations", voc / "JPEGImages", tmp_path / "out", names=["ant", "bee"])
    assert not (tmp_path / "out").exists()


def test_voc_given_names_fix_the_order(voc, tmp_path):
    convert_voc(voc / "Annotations", voc / "JPEGImages", tmp_path / "out", names=["cat", "bee", "ant", "owl"])
    assert (tmp_path / "out/labels/train/x.txt").read_text().split()[0::5] == ["0", "2"]
    assert read_data_file(tmp_path / "out/out.data").classes == 4


@pytest.mark.parametrize("xml, message", [
    ("<annotation><size>", r"bad\.xml: not valid XML"),
    (voc_xml("x.jpg", [("ant", "a", 1, 2, 2, 0)]), r"bad\.xml: <object> 'ant' needs a <bndbox> with numeric"),
    ("<annotation><object><bndbox/></object></annotation>", r"bad\.xml: an <object> without <name>"),
    (voc_xml("x.jpg", []).replace("<width>200", "<width>wide"), r"bad\.xml: <size> width/height are not"),
], ids=["not-xml", "bad-coordinate", "no-name", "bad-size"])
def test_malformed_voc_names_the_file(voc, tmp_path, xml, message):
    (voc / "Annotations/bad.xml").write_text(xml)
    with pytest.raises(UserError, match=message):
        convert_voc(voc / "Annotations", voc / "JPEGImages", tmp_path / "out")


def test_voc_without_size_and_unreadable_image_is_an_error(voc, tmp_path):
    (voc / "JPEGImages/z.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"z\.xml: no usable <size>, and the image .*z\.jpg cannot be read"):
        convert_voc(voc / "Annotations", voc / "JPEGImages", tmp_path / "out")


def test_voc_missing_images_are_skipped_and_counted(voc, tmp_path):
    os.remove(voc / "JPEGImages/y.jpg")
    _, report = convert_voc(voc / "Annotations", voc / "JPEGImages", tmp_path / "out")
    assert (report.images, report.missing_images, report.bad_boxes_skipped) == (2, 1, 0)
    assert not (tmp_path / "out/labels/train/y.txt").exists()


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_converts_and_reports(coco, voc, tmp_path, capsys):
    js, images, out = coco
    args = ["coco", "--json", str(js), "--images", str(images), "--out", str(out), "--split", "val"]
    data_file = main(args)
    text = capsys.readouterr().out
    assert "3 images, 3 boxes written; skipped: 1 crowd, 1 zero-size boxes, 1 missing images" in text
    assert read_data_file(data_file).valid == out / "val.txt"
    names = tmp_path / "voc.names"
    names.write_text("cat\nant\nbee\n")
    main(["voc", "--xml", str(voc), "--images", str(voc / "JPEGImages"), "--out", str(tmp_path / "v"),
          "--names", str(names), "--name", "pets"])
    assert read_data_file(tmp_path / "v/pets.data").names == ["cat", "ant", "bee"]
    assert run_cli(main, args) == 2  # the val labels exist now
    assert "error: " in capsys.readouterr().err


@pytest.mark.slow
def test_cli_module_runs(coco):
    js, images, out = coco
    r = subprocess.run([sys.executable, "-m", "utils.convert", "coco", "--json", str(js), "--images",
                        str(tmp := images / "none"), "--out", str(out)], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --images {tmp}: folder not found"
