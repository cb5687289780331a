"""Image geometry and colour augmentations. Labels are (n, 5) arrays: class, then xyxy in pixels."""

from __future__ import annotations

import cv2
import numpy as np

PAD_VALUE = 114  # grey border, as ultralytics and darknet-style letterboxes use


def letterbox(img: np.ndarray, new_shape: int | tuple[int, int] = 416, auto: bool = False,
              stride: int = 32, scaleup: bool = True, color: int = PAD_VALUE
              ) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping the aspect ratio and pad to ``new_shape`` (h, w).

    With ``auto`` the padding is only what makes each side a multiple of ``stride`` (rectangular
    inference). Returns the image, the ratio (rw, rh) and the padding (padw, padh) on each side.
    """
    h0, w0 = img.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    if not scaleup:
        r = min(r, 1.0)
    w1, h1 = round(w0 * r), round(h0 * r)
    dw, dh = new_shape[1] - w1, new_shape[0] - h1
    if auto:
        dw, dh = dw % stride, dh % stride
    if (w1, h1) != (w0, h0):
        img = cv2.resize(img, (w1, h1), interpolation=cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA)
    top, left = dh // 2, dw // 2
    img = cv2.copyMakeBorder(img, top, dh - top, left, dw - left, cv2.BORDER_CONSTANT,
                             value=(color, color, color))
    return img, (w1 / w0, h1 / h0), (left, top)


def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain: float = 0.015, sgain: float = 0.7,
                vgain: float = 0.4) -> None:
    """Random hue, saturation and value gains, in place on a BGR uint8 image."""
    if not (hgain or sgain or vgain):
        return
    r = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * r[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)


def random_affine(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, out_shape: tuple[int, int],
                  degrees: float = 0.0, translate: float = 0.1, scale: float = 0.5, shear: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Rotate, scale, shear and translate an image and its labels into an ``out_shape`` (h, w) canvas.

    The input's centre lands at the canvas centre, moved by up to ``translate`` of the canvas size, so a
    2s x 2s mosaic comes out as its scaled centre crop. Boxes are the axis-aligned hull of their
    transformed corners, clipped to the canvas; a box that loses more than 90% of its area or shrinks
    below 2 px is dropped.
    """
    h_out, w_out = out_shape
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -img.shape[1] / 2, -img.shape[0] / 2
    rot = np.eye(3)
    a, s = rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(angle=a, center=(0, 0), scale=s)
    sh = np.eye(3)
    sh[0, 1] = np.tan(np.radians(rng.uniform(-shear, shear)))
    sh[1, 0] = np.tan(np.radians(rng.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * w_out
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * h_out
    m = move @ sh @ rot @ centre
    out = cv2.warpAffine(img, m[:2], dsize=(w_out, h_out), borderValue=(PAD_VALUE,) * 3)
    if len(labels) == 0:
        return out, labels
    corners = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(-1, 2)  # (x1y1, x2y2, x1y2, x2y1) per box
    corners = corners @ m[:2, :2].T + m[:2, 2]
    corners = corners.reshape(-1, 8)
    xs, ys = corners[:, 0::2], corners[:, 1::2]
    boxes = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), 1)
    area_before = (labels[:, 3] - labels[:, 1]) * (labels[:, 4] - labels[:, 2]) * s * s
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w_out)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h_out)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (w > 2) & (h > 2) & (w * h > 0.1 * area_before)
    return out, np.concatenate((labels[keep, :1], boxes[keep]), 1).astype(np.float32)
