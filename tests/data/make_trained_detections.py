"""Regenerate tests/data/trained_detections.npz: a trained model's detections on benchmark val images.

    .venv/bin/python tests/data/make_trained_detections.py runs/train/exp/weights/best.pt

Stored: per image, labels [cls, x1, y1, x2, y2] and detections [x1, y1, x2, y2, conf, cls] in
original pixels (conf >= 0.01, at most 100 per image), so the metrics test compares our mAP with
pycocotools on what a real detector outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.io import load_model
from utils.boxes import non_max_suppression, scale_boxes
from utils.datasets import create_dataloader, read_data_file
from utils.evaluate import labels_to_original
from utils.synthetic import ensure_shapes

N_IMAGES = 60


def main(weights: str) -> None:
    model = load_model(weights).eval()
    data = read_data_file(ensure_shapes())
    loader, _ = create_dataloader(data.valid, data.classes, 256, 10, model.max_stride, rect=True)
    labels, dets = [], []
    with torch.no_grad():
        for imgs, targets, _, shapes in loader:
            x = imgs.float() / 255
            out = non_max_suppression(model(x)[0], 0.01, 0.6, max_det=100)
            for i, d in enumerate(out):
                d[:, :4] = scale_boxes(d[:, :4], x.shape[2:], shapes[i][0], shapes[i][1])
                dets.append(d.numpy().astype(np.float32))
                labels.append(labels_to_original(targets[targets[:, 0] == i, 1:], tuple(x.shape[2:]),
                                                  shapes[i]).astype(np.float32))
            if len(dets) >= N_IMAGES:
                break
    out_path = Path(__file__).with_name("trained_detections.npz")
    arrays = {f"labels_{i}": a for i, a in enumerate(labels[:N_IMAGES])}
    arrays |= {f"dets_{i}": a for i, a in enumerate(dets[:N_IMAGES])}
    np.savez_compressed(out_path, **arrays)
    print(f"wrote {out_path} ({out_path.stat().st_size // 1024} KiB, {sum(len(d) for d in dets)} detections)")


if __name__ == "__main__":
    main(sys.argv[1])
