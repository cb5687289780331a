"""The built-in shapes benchmark: deterministic, valid labels that fit the drawn shapes, safe folders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.conftest import TINY_SHAPES
from utils.datasets import load_labels, read_data_file
from utils.errors import UserError
from utils.synthetic import DEFAULT_PARAMS, NAMES, generate_shapes, render_image

TINY = dataclasses.replace(DEFAULT_PARAMS, **TINY_SHAPES)


def test_generation_is_deterministic_and_reads_back(tmp_path):
    a = generate_shapes(tmp_path / "a", TINY)
    b = generate_shapes(tmp_path / "b", TINY)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 2 * (TINY.n_train + TINY.n_val)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    data = read_data_file(a)
    assert data.classes == 6 and data.names == NAMES
    ls = load_labels(data.train, data.classes)
    assert len(ls.images) == TINY.n_train and ls.bad_rows == 0 and ls.bad_images == 0
    assert b.is_file() and not list(tmp_path.glob("*.tmp-*"))


def test_every_class_appears_and_boxes_are_valid():
    p = dataclasses.replace(DEFAULT_PARAMS, max_objects=8)
    seen = set()
    for i in range(12):
        img, labels = render_image(np.random.default_rng((0, 0, i)), p)
        h, w = img.shape[:2]
        assert p.img_min <= h <= p.img_max and p.img_min <= w <= p.img_max
        assert ((labels[:, 1:] > 0) & (labels[:, 1:] <= 1)).all()
        seen |= set(labels[:, 0].astype(int).tolist())
    assert seen == set(range(len(NAMES)))


def test_a_box_is_the_tight_extent_of_its_shape():
    """One object, no noise or clutter: the object's colour appears inside its box and not outside."""
    p = dataclasses.replace(DEFAULT_PARAMS, max_objects=1, noise=0.0, clutter_lines=0, blur_prob=0.0)
    for i in range(6):
        rng = np.random.default_rng((5, 0, i))
        img, labels = render_image(rng, p)
        h, w = img.shape[:2]
        c, cx, cy, bw, bh = labels[0]
        x1, x2 = (cx - bw / 2) * w, (cx + bw / 2) * w
        y1, y2 = (cy - bh / 2) * h, (cy + bh / 2) * h
        inside = img[int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2].reshape(-1, 3).astype(float)
        # the shape's colour (the most common colour inside) must not appear outside the box
        colour = np.median(inside[np.abs(inside - inside.mean(0)).sum(1) < 200], 0)
        far = np.ones((h, w), bool)
        far[max(int(y1) - 2, 0):int(y2) + 3, max(int(x1) - 2, 0):int(x2) + 3] = False
        dist_out = np.abs(img[far].astype(float) - colour).sum(1)
        assert x2 - x1 > 4 and y2 - y1 > 4
        assert (dist_out < 6).mean() < 0.01, f"image {i} class {NAMES[int(c)]}"


def test_existing_folders_are_reused_or_refused_never_touched(tmp_path):
    root = tmp_path / "shapes"
    data = generate_shapes(root, TINY)
    stamp = data.stat().st_mtime_ns
    assert generate_shapes(root, TINY) == data and data.stat().st_mtime_ns == stamp
    other = dataclasses.replace(TINY, seed=1)
    with pytest.raises(UserError, match="move it away"):
        generate_shapes(root, other)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user file")
    with pytest.raises(UserError, match=str(foreign)):
        generate_shapes(foreign, TINY)
    assert (foreign / "keep.txt").read_text() == "user file"
