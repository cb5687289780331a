"""``shapes-hard``: the built-in benchmark that behaves like real detection data.

Twenty shape classes, several of them lookalikes that only fine detail tells apart (filled vs outline
circle, square and triangle; disc, disc with a small hole, ring; square vs 4:3 rectangle vs rhombus;
circle vs ellipse; 5- vs 6-pointed star; pentagon vs hexagon; arrow vs chevron; semicircle vs crescent);
the class never depends on colour. Object sizes are log-uniform from ``size_min_px`` pixels to
``size_max`` of the shorter image side, so most objects are small; up to ``max_objects`` per image,
hidden in part by later ones (each keeps at least ``min_visible`` of its pixels; its box is its whole
extent) or cut by the image border (its box is the part inside, and at least ``min_inside`` of the
shape is inside). Backgrounds are textured (value noise over several octaves, gratings, a colour
field), lit by a gradient, cluttered with distractors of no class (irregular blobs, strokes, arcs);
images are blurred at random, noisy and saved at random JPEG qualities.

The framework (determinism per image, atomic generation, the ``VERSION`` marker) is
:mod:`utils.synthetic`'s; this module only draws.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import cv2
import numpy as np

from utils.drawing import contrasting_colour, keeps_visible, paint, polygon_mask
from utils.errors import UserError

VERSION = "shapes-hard-3"  # bump whenever the drawing changes: every later result is reported on it
NAMES = ["circle", "circle_outline", "disc_small_hole", "ring", "ellipse", "semicircle", "crescent",
         "square", "square_outline", "rect_4x3", "rhombus", "triangle", "triangle_outline", "pentagon",
         "hexagon", "star5", "star6", "cross", "arrow", "chevron"]
# classes whose meaning depends on their proportions: drawn with almost no aspect jitter
EXACT = {"circle", "circle_outline", "disc_small_hole", "ring", "ellipse", "square", "square_outline",
         "rect_4x3", "rhombus", "pentagon", "hexagon"}


@dataclass(frozen=True)
class HardParams:
    seed: int = 0
    n_train: int = 2000
    n_val: int = 300
    img_min: int = 256  # each side drawn in [img_min, img_max]
    img_max: int = 352
    max_objects: int = 18
    size_min_px: float = 12.0  # the smallest object, pixels
    size_max: float = 0.5  # the largest, as a fraction of the shorter side
    min_visible: float = 0.6  # an occluded shape keeps at least this fraction of its pixels
    min_inside: float = 0.5  # a shape cut by the border keeps at least this fraction inside
    distractors: int = 5  # at most this many shapes of no class
    contrast: float = 70.0  # a shape's colour is at least this far (Euclidean, 0-255) from its background
    blur_prob: float = 0.25
    noise_max: float = 8.0  # sensor noise sigma drawn in [1, noise_max]
    jpeg_min: int = 50  # JPEG quality drawn in [jpeg_min, 95]

    name = "shapes-hard"
    names = NAMES
    version = VERSION

    def __post_init__(self) -> None:
        rules = {
            "n_train": (self.n_train >= 1, "at least 1 (--n-train)"),
            "n_val": (self.n_val >= 1, "at least 1 (--n-val)"),
            "img_min": (64 <= self.img_min <= self.img_max, "in [64, img_max]"),
            "max_objects": (self.max_objects >= 1, "at least 1"),
            "size_min_px": (4 <= self.size_min_px <= self.size_max * self.img_min,
                            "in [4, size_max * img_min]"),
            "size_max": (0 < self.size_max <= 0.8, "in (0, 0.8]"),
            "min_visible": (0.0 <= self.min_visible <= 1.0, "in [0, 1]"),
            "min_inside": (0.0 < self.min_inside <= 1.0, "in (0, 1]"),
            "jpeg_min": (1 <= self.jpeg_min <= 95, "in [1, 95]"),
        }
        for key, (holds, need) in rules.items():
            if not holds:
                raise UserError(f"shapes-hard parameter {key}={getattr(self, key)}: must be {need}")

    def digest(self) -> str:
        text = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return render_hard(rng, self)

    def quality(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.jpeg_min, 96))


# ------------------------------------------------------------------ outlines of a unit-size shape

def _ngon(n: int, r: float = 0.5, phase: float = np.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack((r * np.cos(a), -r * np.sin(a)), 1)


def _star(points: int, inner: float) -> np.ndarray:
    a = np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 0.5, inner)
    return np.stack((r * np.cos(a), -r * np.sin(a)), 1)


CIRCLE = _ngon(48)
SQUARE = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
TRIANGLE = _ngon(3, 0.58) + np.array([0, 0.12])


def outline(cls: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons (unit size, centred at 0) with the value each is filled with, in order: 1 paints the
    shape, 0 cuts a hole."""
    name = NAMES[cls]
    hollow = rng.uniform(0.72, 0.8)  # an outline's inner edge (its stroke is 10-14 % of the size)
    if name == "circle":
        return [(CIRCLE, 1)]
    if name == "circle_outline":
        return [(CIRCLE, 1), (CIRCLE * hollow, 0)]
    if name == "disc_small_hole":
        return [(CIRCLE, 1), (CIRCLE * rng.uniform(0.16, 0.22), 0)]
    if name == "ring":
        return [(CIRCLE, 1), (CIRCLE * rng.uniform(0.45, 0.55), 0)]
    if name == "ellipse":
        return [(CIRCLE * (1.0, 0.6), 1)]
    if name == "semicircle":
        t = np.linspace(0, np.pi, 25)
        return [(np.stack((0.5 * np.cos(t), -0.5 * np.sin(t) + 0.25), 1), 1)]
    if name == "crescent":
        return [(CIRCLE, 1), (CIRCLE * 0.85 + (rng.uniform(0.22, 0.28), 0), 0)]
    if name == "square":
        return [(SQUARE, 1)]
    if name == "square_outline":
        return [(SQUARE, 1), (SQUARE * hollow, 0)]
    if name == "rect_4x3":
        return [(SQUARE * (1.0, 0.75), 1)]
    if name == "rhombus":
        return [(np.array([[0, -0.5], [0.31, 0], [0, 0.5], [-0.31, 0]]), 1)]
    if name == "triangle":
        return [(TRIANGLE, 1)]
    if name == "triangle_outline":  # the inner triangle shares the centroid
        return [(TRIANGLE, 1), ((TRIANGLE - (0, 0.12)) * (hollow - 0.12) + (0, 0.12), 0)]
    if name == "pentagon":
        return [(_ngon(5), 1)]
    if name == "hexagon":
        return [(_ngon(6), 1)]
    if name == "star5":
        return [(_star(5, rng.uniform(0.22, 0.26)), 1)]
    if name == "star6":
        return [(_star(6, rng.uniform(0.26, 0.3)), 1)]
    if name == "cross":
        w = rng.uniform(0.14, 0.18)
        return [(np.array([[-w, -0.5], [w, -0.5], [w, -w], [0.5, -w], [0.5, w], [w, w], [w, 0.5], [-w, 0.5],
                           [-w, w], [-0.5, w], [-0.5, -w], [-w, -w]]), 1)]
    if name == "arrow":  # a shaft with a head
        s = rng.uniform(0.09, 0.12)
        return [(np.array([[-0.5, -s], [0.05, -s], [0.05, -0.3], [0.5, 0], [0.05, 0.3], [0.05, s],
                           [-0.5, s]]), 1)]
    # chevron: the arrow's head alone, as a bent stroke
    return [(np.array([[-0.25, -0.5], [0.0, -0.5], [0.35, 0], [0.0, 0.5], [-0.25, 0.5], [0.1, 0]]), 1)]


def _whole_area(polys: list[tuple[np.ndarray, int]], size: float, aspect: float, angle: float) -> int:
    """The shape's pixel count when nothing cuts it (drawn alone on a canvas that holds it)."""
    side = int(np.ceil(size * 1.6)) + 4
    return int(polygon_mask(polys, (side, side), np.array([side / 2, side / 2]), size, aspect, angle).sum())


# ------------------------------------------------------------------ background and distractors

def _value_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Noise in [0, 1] summed over octaves: coarse blotches to fine grain (a natural-looking texture)."""
    out = np.zeros((h, w), np.float32)
    total = 0.0
    for octave, cells in enumerate((3, 7, 17, 41)):
        amp = 0.55 ** octave
        grid = rng.random((cells, cells)).astype(np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
    return np.clip(out / total, 0, 1)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured, lit, colour-varying background (float32 BGR)."""
    g = int(rng.integers(2, 6))
    field = cv2.resize(rng.uniform(30, 225, (g, g, 3)).astype(np.float32), (w, h),
                       interpolation=cv2.INTER_CUBIC)
    texture = _value_noise(rng, h, w)[..., None] - 0.5
    img = field + rng.uniform(15, 45) * texture * rng.uniform(0.5, 1.5, 3).astype(np.float32)
    if rng.random() < 0.5:  # a grating (fabric, blinds, tiles)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
        wave = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period)
        img += rng.uniform(4, 12) * wave[..., None]
    return img


def _lighting(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A multiplicative illumination gradient across the image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(a) + yy * np.sin(a)) / max(h, w)
    ramp -= ramp.min()
    return (rng.uniform(0.55, 0.85) + rng.uniform(0.2, 0.6) * ramp / max(ramp.max(), 1e-6))[..., None]


def _distractors(rng: np.random.Generator, img: np.ndarray, n: int) -> None:
    """Shapes of no class: splats, strokes and arcs (in place). A splat has many vertices at random radii,
    so it never passes for a class (a polygon with few vertices would look like a triangle or a rhombus
    and teach the detector to ignore those)."""
    h, w = img.shape[:2]
    short = min(h, w)
    for _ in range(n):
        colour = rng.uniform(0, 255, 3).tolist()
        kind = rng.integers(0, 3)
        if kind == 0:  # a splat
            k = int(rng.integers(14, 23))
            a = (np.arange(k) + rng.uniform(-0.3, 0.3, k)) * 2 * np.pi / k
            r = rng.uniform(0.35, 1.0, k) * rng.uniform(0.03, 0.2) * short
            c = rng.uniform((0, 0), (w, h))
            pts = np.stack((c[0] + r * np.cos(a), c[1] + r * np.sin(a)), 1)
            cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)
        elif kind == 1:  # a stroke
            p, q = rng.uniform((0, 0), (w, h), (2, 2))
            cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, int(rng.integers(1, 4)),
                     cv2.LINE_AA)
        else:  # an arc
            c = tuple(int(v) for v in rng.uniform((0, 0), (w, h)))
            axes = tuple(int(v) for v in rng.uniform(0.03, 0.25, 2) * short)
            start = float(rng.uniform(0, 360))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), start, start + float(rng.uniform(60, 200)),
                        colour, int(rng.integers(1, 4)), cv2.LINE_AA)


# ------------------------------------------------------------------ one image

def draw_objects(rng: np.random.Generator, img: np.ndarray, p: HardParams
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw up to ``max_objects`` labelled shapes into ``img`` (float32 BGR, in place).

    Returns labels (n, 5) [class, cx, cy, w, h] normalized (a shape's whole extent within the image),
    the fraction of each shape's in-image pixels still visible after the later shapes were drawn, and
    the fraction of each whole shape that lies inside the image.
    """
    h, w = img.shape[:2]
    short = min(h, w)
    owner = np.full((h, w), -1, np.int16)
    areas: list[int] = []
    inside_share: list[float] = []
    labels = []
    lo, hi = np.log(p.size_min_px), np.log(p.size_max * short)
    for _ in range(int(rng.integers(1, p.max_objects + 1))):
        cls = int(rng.integers(0, len(NAMES)))
        size = float(np.exp(rng.uniform(lo, hi)))
        jitter = 0.03 if NAMES[cls] in EXACT else 0.2
        aspect = float(np.exp(rng.uniform(-jitter, jitter)))
        angle = rng.uniform(0, 2 * np.pi)
        polys = outline(cls, rng)
        full = _whole_area(polys, size, aspect, angle)
        for _attempt in range(10):
            centre = rng.uniform((-size * 0.3, -size * 0.3), (w + size * 0.3, h + size * 0.3))
            mask = polygon_mask(polys, (h, w), centre, size, aspect, angle)
            inside = int(mask.sum())
            if inside < 12 or inside < p.min_inside * full:
                continue
            if keeps_visible(owner, mask, areas, p.min_visible):
                break
        else:
            continue
        colour = contrasting_colour(rng, img[mask].mean(0), p.contrast)
        x1, y1, x2, y2 = paint(img, mask, colour, (rng.uniform(0.7, 1.0), rng.uniform(1.0, 1.25)))
        owner[mask] = len(areas)
        areas.append(inside)
        inside_share.append(inside / max(full, 1))
        labels.append([cls, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
    visible = np.bincount(owner[owner >= 0], minlength=len(areas)) / np.maximum(areas, 1)
    return np.array(labels, np.float32).reshape(-1, 5), visible, np.array(inside_share)


def render_hard(rng: np.random.Generator, p: HardParams) -> tuple[np.ndarray, np.ndarray]:
    """One image (BGR uint8) and its labels (n, 5) [class, cx, cy, w, h] normalized."""
    h, w = (int(x) for x in rng.integers(p.img_min, p.img_max + 1, 2))
    img = background(rng, h, w)
    _distractors(rng, img, int(rng.integers(0, p.distractors + 1)))
    labels, _, _ = draw_objects(rng, img, p)
    img *= _lighting(rng, h, w)
    if rng.random() < p.blur_prob:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.4))
    img += rng.normal(0, rng.uniform(1, p.noise_max), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), labels
