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
