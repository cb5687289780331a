"""Datasets: .data parsing, label validation (skipped and counted), unreadable images, cache, augmentation."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from utils.datasets import cache_path, collate, create_dataloader, load_labels, read_data_file
from utils.errors import UserError


def make_dataset(root, n=4, labels=None, classes=2):
    """n 64x80 images under root/images with YOLO labels; returns the .data file."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        img = np.full((64, 80, 3), 90, np.uint8)
        cv2.rectangle(img, (10, 10), (40, 50), (0, 200, 0), -1)
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), img)
        text = labels[i] if labels and i in labels else "0 0.3125 0.46875 0.375 0.625\n"
        (root / "labels" / f"{i}.txt").write_text(text)
    (root / "names.txt").write_text("a\nb\n")
    data = root / "d.data"
    data.write_text(f"classes={classes}\ntrain=images\nvalid=images\nnames=names.txt\n")
    return data


def test_bad_rows_are_dropped_with_file_and_line_and_counted(tmp_path, capsys):
    bad = ("0 0.5 0.5 0.2 0.2\n"  # good
           "0 0.5 0.5 0.2\n"  # 4 columns
           "7 0.5 0.5 0.2 0.2\n"  # class >= classes
           "1 1.5 0.5 0.2 0.2\n"  # outside [0, 1]
           "1 0.5 0.5 0.0 0.2\n"  # zero size
           "x 0.5 0.5 0.2 0.2\n")  # not a number
    data = read_data_file(make_dataset(tmp_path, labels={1: bad}))
    ls = load_labels(data.train, data.classes)
    assert ls.bad_rows == 5 and ls.bad_images == 0
    assert [len(x) for x in ls.labels] == [1, 1, 1, 1]
    printed = capsys.readouterr()
    label = tmp_path / "labels" / "1.txt"
    for line in (2, 3, 4, 5, 6):
        assert f"{label}:{line}:" in printed.err
    assert "5 bad label rows dropped" in printed.out


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    data = read_data_file(make_dataset(tmp_path))
    (tmp_path / "images" / "2.jpg").write_bytes(b"garbage")
    ls = load_labels(data.train, data.classes)
    assert ls.bad_images == 1 and len(ls.images) == 3
    assert "1 unreadable images skipped" in ls.summary()


def test_cache_is_used_and_rebuilt_when_a_label_changes(tmp_path):
    data = read_data_file(make_dataset(tmp_path))
    first = load_labels(data.train, data.classes)
    cache = cache_path(data.train)
    assert cache.is_file() and not (tmp_path / "images" / "labels.cache").exists()  # not beside the data
    stamp = cache.stat().st_mtime_ns
    load_labels(data.train, data.classes)
    assert cache.stat().st_mtime_ns == stamp  # unchanged files: read from the cache
    label = tmp_path / "labels" / "0.txt"
    label.write_text("1 0.5 0.5 0.25 0.25\n0 0.2 0.2 0.1 0.1\n")
    os.utime(label, ns=(stamp + 10**9, stamp + 10**9))
    again = load_labels(data.train, data.classes)
    assert len(again.labels[0]) == 2 and len(first.labels[0]) == 1


@pytest.mark.parametrize("case, match", [
    ("missing", "not found"),
    ("no classes", "missing 'classes='"),
    ("names mismatch", "classes=3 but"),
    ("empty", "no images"),
    ("all unreadable", "no readable images"),
])
def test_data_errors_name_the_file(tmp_path, case, match):
    data = make_dataset(tmp_path)
    if case == "missing":
        data = tmp_path / "nope.data"
    elif case == "no classes":
        data.write_text("train=images\n")
    elif case == "names mismatch":
        data.write_text("classes=3\ntrain=images\nnames=names.txt\n")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        data.write_text("classes=2\ntrain=empty\nnames=names.txt\n")
    else:
        for f in (tmp_path / "images").glob("*.jpg"):
            f.write_bytes(b"x")
    with pytest.raises(UserError, match=match) as e:
        d = read_data_file(data)
        load_labels(d.train, d.classes)
    assert str(tmp_path) in str(e.value)


def test_list_file_paths_are_relative_to_the_list(tmp_path):
    make_dataset(tmp_path)
    lst = tmp_path / "train.txt"
    lst.write_text("images/0.jpg\nimages/1.jpg\n")
    ls = load_labels(lst, 2)
    assert [p.name for p in ls.images] == ["0.jpg", "1.jpg"]


def test_letterbox_labels_follow_the_box_and_rect_shapes_are_stride_multiples(tmp_path):
    data = read_data_file(make_dataset(tmp_path))
    loader, _ = create_dataloader(data.train, 2, 64, 2, stride=32, rect=True)
    imgs, targets, _, shapes = next(iter(loader))
    assert imgs.dtype == torch.uint8 and imgs.shape[2] % 32 == 0 and imgs.shape[3] % 32 == 0
    img = imgs[0].permute(1, 2, 0).numpy()
    t = targets[targets[:, 0] == 0][0]
    h, w = imgs.shape[2:]
    cx, cy = int(t[2] * w), int(t[3] * h)
    assert img[cy, cx, 1] > 150 and img[cy, cx, 0] < 60  # the green box (RGB) is under its label
    (h0, w0), _ = shapes[0]
    assert (h0, w0) == (64, 80)


def test_mosaic_batches_keep_labels_inside_the_image(tmp_path):
    data = read_data_file(make_dataset(tmp_path, n=6))
    loader, _ = create_dataloader(data.train, 2, 64, 3, augment=True, shuffle=True, seed=1)
    for imgs, targets, _, _ in loader:
        assert imgs.shape[1:] == (3, 64, 64)
        xy, wh = targets[:, 2:4], targets[:, 4:6]
        assert ((xy - wh / 2) >= -1e-6).all() and ((xy + wh / 2) <= 1 + 1e-6).all() and (wh > 0).all()


def test_collate_sets_the_image_index():
    a = (torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(2, 6), "a", None)
    b = (torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(1, 6), "b", None)
    imgs, t, paths, _ = collate([a, b])
    assert imgs.shape == (2, 3, 8, 8) and t[:, 0].tolist() == [0, 0, 1] and paths == ["a", "b"]
