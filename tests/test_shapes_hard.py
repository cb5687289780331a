"""shapes-hard: deterministic, atomic, valid labels (boxes inside the image, classes in range, the
visibility and border rules kept), reachable by name, and as hard as its description says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from utils.datasets import load_labels, read_data_file, resolve_data
from utils.drawing import polygon_mask
from utils.errors import UserError
from utils.shapes_hard import EXACT, NAMES, HardParams, draw_objects, outline, render_hard
from utils.synthetic import builtin_params, generate_shapes

TINY = HardParams(n_train=4, n_val=2, img_min=96, img_max=128, max_objects=12)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_generation_is_byte_identical_and_reads_back(tmp_path):
    a = generate_shapes(tmp_path / "a", TINY)
    generate_shapes(tmp_path / "b", TINY)
    files = _files(tmp_path / "a")
    assert a.name == "shapes-hard.data" and files == _files(tmp_path / "b")
    assert len(files) == 2 * (TINY.n_train + TINY.n_val) + 5
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    other = generate_shapes(tmp_path / "c", dataclasses.replace(TINY, seed=1))
    assert (other.parent / "images/train/000000.jpg").read_bytes() != \
        (a.parent / "images/train/000000.jpg").read_bytes()
    data = read_data_file(a)
    assert data.classes == 20 and data.names == NAMES
    for split, n in ((data.train, TINY.n_train), (data.valid, TINY.n_val)):
        labels = load_labels(split, data.classes, verbose=False)
        assert len(labels.images) == n and labels.bad_rows == 0 and labels.bad_images == 0
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(UserError, match="is not the shapes-hard benchmark"):
        generate_shapes(tmp_path / "a", dataclasses.replace(TINY, seed=2))  # another dataset's folder


def test_boxes_classes_visibility_and_border_rules():
    p = HardParams(img_min=160, img_max=224)
    seen, small, cut = set(), 0, 0
    for i in range(40):
        rng = np.random.default_rng((7, 0, i))
        img = np.full((192, 256, 3), 128, np.float32)
        labels, visible, inside = draw_objects(rng, img, p)
        assert len(labels) == len(visible) == len(inside) and len(labels) <= p.max_objects
        cls, xy, wh = labels[:, 0], labels[:, 1:3], labels[:, 3:]
        assert (cls == cls.round()).all() and ((cls >= 0) & (cls < len(NAMES))).all()
        assert (wh > 0).all() and (xy - wh / 2 >= -1e-6).all() and (xy + wh / 2 <= 1 + 1e-6).all()
        # every object keeps at least min_visible of its in-image pixels after the later ones were drawn
        assert (visible >= p.min_visible - 1e-9).all()
        # a shape cut by the border keeps at least min_inside of its pixels inside (its box is that part)
        assert (inside >= p.min_inside - 0.02).all()  # 2 %: the whole shape is drawn on its own canvas
        seen |= set(cls.astype(int).tolist())
        small += int(((wh * (256, 192)).max(1) < 24).sum())
        edge = (xy - wh / 2 <= 1e-6) | (xy + wh / 2 >= 1 - 1e-6)
        cut += int((edge.any(1) & (inside < 0.98)).sum())
    assert seen == set(range(len(NAMES)))
    assert small >= 40 and cut >= 10  # many small objects, some cut by the border


def test_lookalikes_differ_only_in_detail():
    """Pairs the issue names as lookalikes: same size on the canvas, masks that differ in few pixels."""
    rng = np.random.default_rng(0)

    def mask(name):
        return polygon_mask(outline(NAMES.index(name), rng), (80, 80), np.array([40.0, 40.0]), 60, 1.0, 0.0)

    for a, b in (("circle", "disc_small_hole"), ("square", "rect_4x3"), ("star5", "star6"),
                 ("pentagon", "hexagon"), ("circle", "circle_outline")):
        ma, mb = mask(a), mask(b)
        assert ma.sum() and mb.sum() and (ma != mb).any()
        overlap = (ma & mb).sum() / (ma | mb).sum()
        assert overlap > 0.2, (a, b, overlap)
    assert {"square", "rect_4x3", "circle", "ellipse"} <= EXACT


def test_images_vary_in_size_and_quality():
    p = HardParams()
    sizes = set()
    for i in range(6):
        img, _ = render_hard(np.random.default_rng((0, 0, i)), p)
        assert img.dtype == np.uint8 and p.img_min <= min(img.shape[:2]) <= max(img.shape[:2]) <= p.img_max
        sizes.add(img.shape[:2])
    assert len(sizes) == 6
    assert len({p.quality(np.random.default_rng(i)) for i in range(10)}) > 3


def test_selected_by_name_or_documented_path(tmp_path, monkeypatch):
    import utils.synthetic as synthetic

    monkeypatch.setattr(synthetic, "DATASETS", tmp_path)
    monkeypatch.setattr(synthetic, "BUILTIN", {"shapes-hard": TINY})
    assert builtin_params("shapes-hard") == (tmp_path / "shapes-hard", TINY)
    data = read_data_file("shapes-hard")  # --data shapes-hard
    assert data.path == tmp_path / "shapes-hard" / "shapes-hard.data" and data.classes == 20
    assert read_data_file(tmp_path / "shapes-hard" / "shapes-hard.data").names == NAMES
    assert resolve_data("shapes-hard") == tmp_path / "shapes-hard" / "shapes-hard.data"  # train.py's way


def test_bad_parameters_are_one_line():
    with pytest.raises(UserError, match="size_min_px"):
        HardParams(size_min_px=2)
    with pytest.raises(UserError, match="min_inside"):
        HardParams(min_inside=0)
