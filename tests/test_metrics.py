"""Our mAP against real pycocotools on the same detections, hand-checked AP values, confusion matrix."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from utils.metrics import (
    ConfusionMatrix,
    DetectionStats,
    coco_detections,
    coco_ground_truth,
    match_detections,
    pycocotools_eval,
)
from utils.plots import class_colour, draw_detections, plot_confusion_matrix, plot_pr_curve, plot_results

NAMES = ["a", "b", "c", "d"]


def compare_with_pycocotools(labels: list[np.ndarray], dets: list[np.ndarray], names=NAMES):
    """(ours, pycocotools) (mAP@0.5:0.95, mAP@0.5) for labels [cls, xyxy] and dets [xyxy, conf, cls]."""
    stats, rows, images = DetectionStats(), [], []
    for i, (lab, d) in enumerate(zip(labels, dets)):
        stats.update(d, lab)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 400, "height": 400})
        rows += coco_detections(i, d)
    ours = stats.compute(names)
    ref = pycocotools_eval(coco_ground_truth(images, labels, names), rows)
    return (ours.map, ours.map50), (ref["map"], ref["map50"])


def random_labels(rng, n_images=25):
    out = []
    for i in range(n_images):
        m = 0 if i == 3 else int(rng.integers(1, 9))  # image 3 has no ground truth
        xy = rng.uniform(0, 300, (m, 2))
        cls = rng.integers(0, 3, m)  # class 3 never appears in the ground truth
        out.append(np.c_[cls, xy, xy + rng.uniform(8, 90, (m, 2))])
    return out


def test_random_detections_agree_with_pycocotools():
    rng = np.random.default_rng(0)
    labels = random_labels(rng)
    dets = []
    for lab in labels:
        n = int(rng.integers(0, 40))
        xy = rng.uniform(0, 300, (n, 2))
        if len(lab):  # random boxes, some of them near a ground truth corner so that a few match
            near = rng.random(n) < 0.5
            xy[near] = lab[rng.integers(0, len(lab), near.sum()), 1:3] + rng.normal(0, 4, (near.sum(), 2))
        dets.append(np.c_[xy, xy + rng.uniform(8, 90, (n, 2)), rng.random(n), rng.integers(0, 4, n)])
    ours, ref = compare_with_pycocotools(labels, dets)
    assert ref[1] > 0  # the case is not trivially zero
    assert ours == pytest.approx(ref, abs=1e-9)


def test_near_miss_detections_agree_with_pycocotools():
    """Like a trained detector: jittered copies of the truth, duplicates, wrong classes, false positives,
    confidences that grow with IoU, over 100 detections in some images (the per-class cap matters)."""
    rng = np.random.default_rng(1)
    labels = random_labels(rng, 30)
    dets = []
    for lab in labels:
        rows = []
        for c, x1, y1, x2, y2 in lab:
            for _ in range(int(rng.integers(0, 4))):  # misses, hits and duplicates
                s = rng.uniform(0.01, 0.25) * (x2 - x1)
                box = np.array([x1, y1, x2, y2]) + rng.normal(0, s, 4)
                box[2:] = np.maximum(box[2:], box[:2] + 1)
                cls = c if rng.random() < 0.85 else rng.integers(0, 4)
                rows.append([*box, np.clip(1 - s / 30 + rng.normal(0, 0.1), 0.01, 1), cls])
        for _ in range(int(rng.integers(0, 120))):  # background false positives, low confidence
            xy = rng.uniform(0, 300, 2)
            rows.append([*xy, *(xy + rng.uniform(5, 60, 2)), rng.uniform(0, 0.4), rng.integers(0, 4)])
        dets.append(np.array(rows).reshape(-1, 6))
    ours, ref = compare_with_pycocotools(labels, dets)
    assert 0.2 < ref[0] < 0.95
    assert ours == pytest.approx(ref, abs=1e-9)


def test_hand_computed_ap():
    lab = np.array([[0, 0, 0, 10, 10], [0, 20, 20, 30, 30]], float)
    perfect = np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 0]], float)
    s = DetectionStats()
    s.update(perfect, lab)
    assert s.compute().map == pytest.approx(1.0)
    # a false positive ranked above one of the two hits: precision 1 up to recall 0.5, then 2/3
    fp_first = np.array([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.85, 0], [20, 20, 30, 30, 0.8, 0]], float)
    s = DetectionStats()
    s.update(fp_first, lab)
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101  # recall points 0..0.50 at 1, 0.51..1.0 at 2/3
    assert s.compute().map50 == pytest.approx(expected)


def test_match_takes_the_best_unmatched_truth_per_threshold():
    lab = np.array([[0, 0, 0, 10, 10], [0, 1, 0, 11, 10]], float)
    dets = np.array([[1, 0, 11, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]], float)
    tp = match_detections(dets, lab)
    assert tp.all()  # the first takes the exact box 2, the second the exact box 1


def test_ties_follow_pycocotools():
    """Equal IoUs go to the later ground truth; equal scores keep image order (pycocotools' rules)."""
    lab = np.array([[0, 0, 0, 10, 10], [0, 10, 0, 20, 10]], float)
    # the first detection overlaps both truths with IoU exactly 0.5, the second only the first truth
    dets = np.array([[0, 0, 20, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]], float)
    np.testing.assert_array_equal(match_detections(dets, lab)[:, 0], [True, True])
    ours, ref = compare_with_pycocotools([lab], [dets])
    assert ref[1] == pytest.approx(1.0)
    assert ours == pytest.approx(ref, abs=1e-12)
    # equal scores in two images: the false positive of image 0 ranks above the hit of image 1
    labels = [np.array([[1, 0, 0, 10, 10]], float)] * 2
    tied = [np.array([[50, 50, 60, 60, 0.5, 1]], float), np.array([[0, 0, 10, 10, 0.5, 1]], float)]
    ours, ref = compare_with_pycocotools(labels, tied)
    assert ref[1] == pytest.approx(51 * 0.5 / 101)
    assert ours == pytest.approx(ref, abs=1e-12)


def test_confusion_matrix_counts():
    cm = ConfusionMatrix(2, conf=0.25, iou_thres=0.45)
    lab = np.array([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [1, 40, 40, 50, 50]], float)
    dets = np.array([[0, 0, 10, 10, 0.9, 0],  # correct
                     [20, 20, 30, 30, 0.9, 0],  # class 1 predicted as 0
                     [70, 70, 80, 80, 0.9, 1],  # background
                     [40, 40, 50, 50, 0.1, 1]], float)  # below conf: box 3 missed
    cm.update(dets, lab)
    expected = np.array([[1, 1, 0], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)


def test_plots_write_readable_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = random_labels(rng, 5)
    s = DetectionStats()
    cm = ConfusionMatrix(4)
    for lab in labels:
        d = np.c_[lab[:, 1:5] + 1, np.full(len(lab), 0.9), lab[:, 0]]
        s.update(d, lab)
        cm.update(d, lab)
    csv = tmp_path / "results.csv"
    csv.write_text("epoch,train/box,metrics/mAP_0.5\n1,0.1,0.2\n2,0.08,0.4\n")
    for path in (plot_pr_curve(s.compute(NAMES), tmp_path / "pr.png"),
                 plot_confusion_matrix(cm, NAMES, tmp_path / "cm.png"),
                 plot_results(csv, tmp_path / "results.png")):
        img = cv2.imread(str(path))
        assert img is not None and img.shape[0] > 100 and img.std() > 1


@pytest.mark.parametrize("epochs", [[1, 2], [1, 2, 3], list(range(1, 31))])
def test_results_plot_shows_the_epoch_column_on_whole_epoch_ticks(tmp_path, monkeypatch, epochs):
    """results.png: x is the csv's epoch column as written (1-based there), ticked on whole epochs only."""
    import utils.plots

    seen = {}
    real = utils.plots.save_figure

    def keep(fig, path, **kw):
        seen["panels"] = [(list(ax.get_lines()[0].get_xdata()), ax.get_xticks(), ax.get_xlim())
                          for ax in fig.axes if ax.get_lines()]
        return real(fig, path, **kw)

    monkeypatch.setattr(utils.plots, "save_figure", keep)
    csv = tmp_path / "results.csv"
    rows = "".join(f"{e},{1 / e:.3f},{e / 40:.3f}\n" for e in epochs)
    csv.write_text("epoch,train/box,metrics/mAP_0.5\n" + rows)
    plot_results(csv, tmp_path / "results.png")
    assert len(seen["panels"]) == 2
    for xs, ticks, (lo, hi) in seen["panels"]:
        assert xs == epochs
        shown = [t for t in ticks if lo <= t <= hi]
        assert len(shown) >= 2 and all(float(t).is_integer() for t in shown), shown


def test_draw_detections_boxes_in_a_fixed_colour_per_class():
    img = np.zeros((120, 160, 3), np.uint8)
    dets = np.array([[20, 40, 70, 100, 0.9, 0], [90, 40, 150, 100, 0.5, 3]], float)
    out = draw_detections(img, dets, NAMES)
    assert class_colour(0) == class_colour(0) != class_colour(3)
    def near(pixel, colour):  # anti-aliased lines blend a little with the background
        return np.abs(pixel.astype(int) - colour).max() <= 40

    assert near(out[70, 20], class_colour(0)) and not near(out[70, 20], class_colour(3))  # box 0 edge
    assert near(out[70, 150], class_colour(3)) and not near(out[70, 150], class_colour(0))  # box 1 edge
    assert not out[70, 40:60].any() and not out[5:30, 5:15].any()  # inside and outside stay untouched


def test_trained_detector_output_agrees_with_pycocotools():
    """Detections of yolo-small trained on the benchmark (tests/data/make_trained_detections.py)."""
    from tests.conftest import TEST_DATA

    z = np.load(TEST_DATA / "trained_detections.npz")
    n = len([k for k in z.files if k.startswith("labels_")])
    labels = [z[f"labels_{i}"].astype(np.float64) for i in range(n)]
    dets = [z[f"dets_{i}"].astype(np.float64) for i in range(n)]
    ours, ref = compare_with_pycocotools(labels, dets, names=[str(i) for i in range(6)])
    assert ref[1] > 0.05
    assert ours == pytest.approx(ref, abs=1e-9)


def test_pycocotools_breakdown_by_size_and_with_classes_ignored():
    # every box found exactly, but the large objects named with the wrong class
    small = np.array([[0, 10, 10, 30, 30], [1, 100, 100, 120, 125]], float)  # 400 and 500 px²
    large = np.array([[2, 50, 50, 250, 250]], float)  # 40000 px²
    labels = [small, large]
    dets = [np.c_[small[:, 1:], np.full(2, 0.9), small[:, 0]],
            np.c_[large[:, 1:], np.full(1, 0.9), np.full(1, 3.0)]]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 400, "height": 400} for i in range(2)]
    rows = [r for i, d in enumerate(dets) for r in coco_detections(i, d)]
    coco = pycocotools_eval(coco_ground_truth(images, labels, NAMES), rows)
    assert coco["map_small"] == pytest.approx(1.0)
    assert coco["map_medium"] == -1  # no object between 32² and 96² px
    assert coco["map_large"] == pytest.approx(0.0)
    assert coco["map"] == pytest.approx(2 / 3)  # a and b found, c missed (d has no ground truth)
    assert coco["map_any_class"] == pytest.approx(1.0)
    assert coco["map50_any_class"] == pytest.approx(1.0)


def test_pycocotools_without_detections_scores_zero_under_every_key():
    images = [{"id": 0, "file_name": "0.jpg", "width": 400, "height": 400}]
    gt = coco_ground_truth(images, [np.array([[0, 10, 10, 60, 60]], float)], NAMES)
    some = pycocotools_eval(gt, coco_detections(0, np.array([[10, 10, 60, 60, 0.9, 0]], float)))
    none = pycocotools_eval(gt, [])
    assert set(none) == set(some) and all(v == 0.0 for v in none.values())
