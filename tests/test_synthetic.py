"""The built-in shapes benchmark: deterministic, valid labels that fit the drawn shapes, safe folders."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

import utils.synthetic as synthetic
from tests.conftest import TINY_SHAPES
from utils.cli import run_cli
from utils.datasets import load_labels, read_data_file
from utils.errors import UserError
from utils.synthetic import DEFAULT_PARAMS, NAMES, draw_shapes, generate_shapes, main, render_image

TINY = dataclasses.replace(DEFAULT_PARAMS, **TINY_SHAPES)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_generation_is_deterministic_and_reads_back(tmp_path):
    a = generate_shapes(tmp_path / "a", TINY)
    b = generate_shapes(tmp_path / "b", TINY)
    files = _files(tmp_path / "a")
    assert len(files) == 2 * (TINY.n_train + TINY.n_val) + 5 and files == _files(tmp_path / "b")
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    c = generate_shapes(tmp_path / "c", dataclasses.replace(TINY, seed=1))
    first = "labels/train/000000.txt"
    assert (c.parent / first).read_bytes() != (a.parent / first).read_bytes()
    data = read_data_file(a)
    assert data.classes == 6 and data.names == NAMES
    for split, n in ((data.train, TINY.n_train), (data.valid, TINY.n_val)):
        ls = load_labels(split, data.classes, verbose=False)
        assert len(ls.images) == n and ls.bad_rows == 0 and ls.bad_images == 0
    assert b.is_file() and not list(tmp_path.glob("*.tmp-*"))


def test_labels_are_valid_and_every_class_appears():
    p = dataclasses.replace(DEFAULT_PARAMS, max_objects=8)
    seen = set()
    for i in range(12):
        img, labels = render_image(np.random.default_rng((0, 0, i)), p)
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and img.shape[2] == 3
        assert p.img_min <= h <= p.img_max and p.img_min <= w <= p.img_max
        assert labels.shape[1] == 5 and 1 <= len(labels) <= p.max_objects
        cls, xy, wh = labels[:, 0], labels[:, 1:3], labels[:, 3:]
        assert (cls == cls.round()).all() and ((cls >= 0) & (cls < len(NAMES))).all()
        assert (wh > 0).all() and (xy - wh / 2 >= -1e-6).all() and (xy + wh / 2 <= 1 + 1e-6).all()
        seen |= set(cls.astype(int).tolist())
    assert seen == set(range(len(NAMES)))


def test_a_box_is_the_tight_extent_of_its_shape():
    """One shape on a flat background: its box is the bounding box of the changed pixels."""
    p = dataclasses.replace(DEFAULT_PARAMS, max_objects=1)
    classes = set()
    for i in range(24):
        h, w = 96 + 2 * i, 128 - i
        img = np.full((h, w, 3), 128, np.float32)
        labels, _ = draw_shapes(np.random.default_rng((7, i)), img, p)
        c, cx, cy, bw, bh = labels[0]
        box = np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        ys, xs = np.nonzero(np.abs(img - 128).sum(2) > 1)
        changed = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(box - changed).max() <= 0.5, f"shape {i} ({NAMES[int(c)]}): {box} vs {changed}"
        classes.add(int(c))
    assert len(classes) == len(NAMES)


def _shape_name(mask: np.ndarray) -> str:
    """Name a lone shape from its geometry alone: holes, convexity, deep notches, fill of its rotated box."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    outer = max((c for c, h in zip(contours, hierarchy[0]) if h[3] < 0), key=cv2.contourArea)
    if any(h[3] >= 0 and cv2.contourArea(c) > 10 for c, h in zip(contours, hierarchy[0])):
        return "ring"
    area = cv2.contourArea(outer)
    if area / cv2.contourArea(cv2.convexHull(outer)) < 0.9:
        _, radius = cv2.minEnclosingCircle(outer)
        defects = cv2.convexityDefects(outer, cv2.convexHull(outer, returnPoints=False))
        notches = int((defects[:, 0, 3] / 256 > 0.1 * radius).sum())
        return {5: "star", 4: "cross"}.get(notches, f"{notches}-notched")
    _, (rw, rh), _ = cv2.minAreaRect(outer)
    fill = area / (rw * rh)  # triangle 0.5, ellipse pi/4, rectangle 1
    return "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"


def test_the_class_is_told_by_shape_alone():
    """Colour, size, aspect and rotation vary; the geometry of every drawn shape still names its class."""
    p = dataclasses.replace(DEFAULT_PARAMS, max_objects=1, size_min=0.3, size_max=0.6)
    counts = dict.fromkeys(NAMES, 0)
    for i in range(90):
        img = np.full((128, 128, 3), 128, np.float32)
        labels, _ = draw_shapes(np.random.default_rng((11, i)), img, p)
        c, cx, cy, bw, bh = labels[0]
        if min(cx - bw / 2, cy - bh / 2) <= 0 or max(cx + bw / 2, cy + bh / 2) >= 1:
            continue  # cut by the image border
        mask = (np.abs(img - 128).sum(2) > 1).astype(np.uint8)
        assert _shape_name(mask) == NAMES[int(c)], f"shape {i}"
        counts[NAMES[int(c)]] += 1
    assert min(counts.values()) >= 5, counts


def test_overlapping_shapes_stay_mostly_visible():
    p = dataclasses.replace(DEFAULT_PARAMS, max_objects=8, size_min=0.3, size_max=0.5, min_visible=0.6)
    fractions = []
    for i in range(8):
        img = np.full((128, 128, 3), 128, np.float32)
        labels, visible = draw_shapes(np.random.default_rng((3, i)), img, p)
        assert visible.shape == (len(labels),) and visible[-1] == 1.0
        fractions += visible.tolist()
    assert min(fractions) >= p.min_visible
    assert sum(f < 0.95 for f in fractions) >= 3  # occlusion really happens


def test_existing_folders_are_reused_or_refused_never_touched(tmp_path, capsys):
    root = tmp_path / "shapes"
    data = synthetic.ensure_shapes(root, TINY)
    assert "generating the built-in shapes benchmark" in capsys.readouterr().out
    stamp = data.stat().st_mtime_ns
    assert synthetic.ensure_shapes(root, TINY) == data and data.stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match="move it away"):
        generate_shapes(root, dataclasses.replace(TINY, seed=1))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user file")
    with pytest.raises(UserError, match=str(foreign)):
        generate_shapes(foreign, TINY)
    assert [str(f) for f in _files(foreign)] == ["keep.txt"]
    assert (foreign / "keep.txt").read_text() == "user file"


def test_an_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    written = []
    real_imencode = synthetic.cv2.imencode

    def imencode_then_interrupt(ext, img, params):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(ext)
        return real_imencode(ext, img, params)

    monkeypatch.setattr(synthetic.cv2, "imencode", imencode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "shapes", TINY)
    assert len(written) == 3 and list(tmp_path.iterdir()) == []


def test_a_dataset_finished_first_by_another_process_is_used(tmp_path, monkeypatch):
    """Two ranks generating at once: the slower one finds the finished dataset and drops its own copy."""
    root = tmp_path / "shapes"
    real_write_split = synthetic._write_split
    raced = []

    def write_split_while_another_finishes(folder, split, n, p):
        if split == "val" and not raced:
            raced.append(folder)
            generate_shapes(root, p)  # the other process wins the rename
        real_write_split(folder, split, n, p)

    monkeypatch.setattr(synthetic, "_write_split", write_split_while_another_finishes)
    assert generate_shapes(root, TINY) == root / "shapes.data"
    assert raced and not raced[0].exists() and [p.name for p in tmp_path.iterdir()] == ["shapes"]
    assert read_data_file(root / "shapes.data").classes == len(NAMES)


def test_cli_prints_counts_and_rejects_bad_options(tmp_path, capsys):
    root = tmp_path / "shapes"
    data = main(["--root", str(root), "--n-train", "3", "--n-val", "2", "--seed", "4"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == str(data) and data == root / "shapes.data"
    for split, line in zip(("train", "val"), out[-3:-1]):
        rows = [r for f in (root / "labels" / split).glob("*.txt") for r in f.read_text().splitlines()]
        counts = [sum(r.split()[0] == str(k) for r in rows) for k in range(len(NAMES))]
        assert line == f"{split}: " + ", ".join(f"{n} {c}" for n, c in zip(NAMES, counts))
    assert run_cli(main, ["--root", str(tmp_path / "bad"), "--n-train", "0"]) == 2
    assert "argument --n-train: 0 is not an integer from 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="img_min=300"):
        dataclasses.replace(TINY, img_min=300, img_max=200)
