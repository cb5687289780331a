"""Drawing steps the built-in benchmarks share (:mod:`utils.synthetic`, :mod:`utils.shapes_hard`): a
shape's mask from its polygons, the occlusion rule, a colour that stands out, and painting a shape."""

from __future__ import annotations

import cv2
import numpy as np


def polygon_mask(polys: list[tuple[np.ndarray, int]], hw: tuple[int, int], centre: np.ndarray, size: float,
                 aspect: float, angle: float) -> np.ndarray:
    """Binary mask (bool) of a unit-size shape given as polygons with their fill (1 paints, 0 cuts a
    hole), scaled, stretched by ``aspect``, rotated and placed at ``centre`` in an image of shape ``hw``."""
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale = np.array([size * aspect, size / aspect])
    mask = np.zeros(hw, np.uint8)
    for poly, value in polys:
        pts = ((poly * scale) @ rot.T + centre) * 16  # 4 fractional bits for smooth edges
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], value, cv2.LINE_8, shift=4)
    return mask.astype(bool)


def keeps_visible(owner: np.ndarray, mask: np.ndarray, areas: list[int], min_visible: float) -> bool:
    """Whether every earlier shape (``owner`` says which shows at each pixel, ``areas`` their pixel
    counts) keeps at least ``min_visible`` of its pixels when a shape covering ``mask`` is drawn on top."""
    hidden = np.bincount(owner[mask & (owner >= 0)], minlength=len(areas))
    shown = np.bincount(owner[owner >= 0], minlength=len(areas))
    return all(shown[k] - hidden[k] >= min_visible * areas[k] for k in range(len(areas)))


def contrasting_colour(rng: np.random.Generator, local: np.ndarray, contrast: float) -> np.ndarray:
    """A random colour at least ``contrast`` (Euclidean, 0-255) from the local background mean."""
    for _ in range(20):
        c = rng.integers(0, 256, 3).astype(np.float32)
        if np.linalg.norm(c - local) > contrast:
            return c
    return 255 - local


def paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, shade: tuple[float, float]
          ) -> tuple[int, int, int, int]:
    """Paint ``mask`` into ``img`` (float32 BGR, in place) in ``colour``, shaded from ``shade[0]`` to
    ``shade[1]`` left to right, with a soft edge; returns the mask's box (x1, y1, x2, y2)."""
    ys, xs = np.nonzero(mask)
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    patch = np.clip(colour * np.linspace(*shade, x2 - x1)[None, :, None], 0, 255)
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0)[y1:y2, x1:x2, None]
    img[y1:y2, x1:x2] = img[y1:y2, x1:x2] * (1 - alpha) + patch * alpha
    return x1, y1, x2, y2
