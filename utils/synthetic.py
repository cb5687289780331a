"""The built-in benchmark: a deterministic synthetic detection dataset of six shape classes.

Every image has a smooth random colour field with line clutter and sensor noise as background, and
1..``max_objects`` shapes (circle, square, triangle, star, cross, ring) of random size, aspect, rotation
and colour (class comes from shape only). Shapes may overlap while every earlier shape keeps at least
``min_visible`` of its pixels; a box is the whole shape's extent (amodal), also where it is partly
hidden. Some images are blurred. Images have random sizes and are saved as JPEG (quality 92).

The same ``ShapesParams`` give byte-identical files with the same NumPy and OpenCV, because each
image draws from its own generator seeded by (seed, split, index). Generation writes into a sibling
``root.tmp-<pid>-*`` folder and renames it into place, so an interrupted run leaves no half dataset; the
``VERSION`` marker (version + parameter hash) says whether an existing folder is this dataset.
Layout (the ``.data`` convention, paths relative to the ``.data`` folder)::

    root/shapes.data  shapes.names  train.txt  val.txt  VERSION
    root/images/{train,val}/000000.jpg     root/labels/{train,val}/000000.txt

Regenerate elsewhere with ``python -m utils.synthetic --root DIR``. Bump ``VERSION`` whenever the
drawing changes: every later result is reported on this dataset.

This module also generates the other built-in benchmarks (``BUILTIN``): ``shapes-mini`` (the same
drawing, 96 + 32 images, for smoke runs) and ``shapes-hard`` (:mod:`utils.shapes_hard`, 20 classes,
small and crowded objects on textured backgrounds), each from its parameter class's ``render``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from tqdm import tqdm

from utils.drawing import contrasting_colour, keeps_visible, paint, polygon_mask
from utils.errors import UserError
from utils.outputs import atomic_write
from utils.shapes_hard import HardParams

VERSION = "shapes-2"
NAMES = ["circle", "square", "triangle", "star", "cross", "ring"]
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "datasets" / "shapes"


class Benchmark(Protocol):
    """What generation needs of a benchmark's parameters (:class:`ShapesParams`,
    :class:`utils.shapes_hard.HardParams`)."""
    name: str  # the stem of its .data and .names files
    names: list[str]
    version: str
    seed: int
    n_train: int
    n_val: int

    def digest(self) -> str: ...
    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...
    def quality(self, rng: np.random.Generator) -> int: ...


@dataclass(frozen=True)
class ShapesParams:
    seed: int = 0
    n_train: int = 2000
    n_val: int = 250
    img_min: int = 224  # each side drawn in [img_min, img_max]
    img_max: int = 384
    max_objects: int = 6
    size_min: float = 0.10  # object size as a fraction of the shorter image side
    size_max: float = 0.40
    min_visible: float = 0.6  # an occluded shape keeps at least this fraction of its pixels
    noise: float = 6.0  # sensor noise sigma (grey levels)
    clutter_lines: int = 6  # at most this many random lines in the background
    blur_prob: float = 0.15
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        rules = {  # option: (holds, what it must be)
            "n_train": (self.n_train >= 1, "at least 1 (--n-train)"),
            "n_val": (self.n_val >= 1, "at least 1 (--n-val)"),
            "img_min": (32 <= self.img_min <= self.img_max, "in [32, img_max]"),
            "max_objects": (self.max_objects >= 1, "at least 1"),
            "size_min": (0.0 < self.size_min <= self.size_max, "in (0, size_max]"),
            "size_max": (self.size_max <= 0.8, "at most 0.8"),
            "min_visible": (0.0 <= self.min_visible <= 1.0, "in [0, 1]"),
            "noise": (self.noise >= 0, "at least 0"),
            "clutter_lines": (self.clutter_lines >= 0, "at least 0"),
            "blur_prob": (0.0 <= self.blur_prob <= 1.0, "in [0, 1]"),
            "jpeg_quality": (1 <= self.jpeg_quality <= 100, "in [1, 100]"),
        }
        for name, (holds, need) in rules.items():
            if not holds:
                raise UserError(f"shapes parameter {name}={getattr(self, name)}: must be {need}")

    name = "shapes"  # the .data and .names files' stem
    names = NAMES
    version = VERSION

    def digest(self) -> str:
        text = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return render_image(rng, self)

    def quality(self, rng: np.random.Generator) -> int:
        return self.jpeg_quality


DEFAULT_PARAMS = ShapesParams()
# The built-in benchmarks by folder name under datasets/; a command given datasets/<name>/<stem>.data,
# or the bare name as --data, generates it on first use. shapes-hard is the yardstick the published
# measurements use; shapes is the quick, easy one; shapes-mini is for smoke runs, not for measurements.
# Each parameter class draws its own images (render, quality) and names its classes; this module
# generates, marks and finds them.
BUILTIN: dict[str, Benchmark] = {"shapes": DEFAULT_PARAMS, "shapes-mini": ShapesParams(n_train=96, n_val=32),
                           "shapes-hard": HardParams()}
DATASETS = DEFAULT_ROOT.parent


def builtin_params(data: str | Path) -> tuple[Path, Benchmark] | None:
    """The root and parameters of the built-in benchmark that ``data`` names: its documented ``.data``
    path, or its bare name (``shapes-hard``)."""
    for name, params in BUILTIN.items():
        if str(data) == name or Path(data).resolve() == DATASETS / name / f"{params.name}.data":
            return DATASETS / name, params
    return None


def _outline(cls: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons of a unit-size shape centred at 0, each with its fill (a ring's hole is filled with 0)."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack((np.cos(t), np.sin(t)), 1) * 0.5
    if cls == 0:
        return [(circle, 1)]
    if cls == 1:
        return [(np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]), 1)]
    if cls == 2:
        a = np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        return [(np.stack((np.cos(a), -np.sin(a)), 1) * 0.58 + (0, 0.12), 1)]
    if cls == 3:
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 0.5, rng.uniform(0.2, 0.28))
        return [(np.stack((r * np.cos(a), -r * np.sin(a)), 1), 1)]
    if cls == 4:
        w = rng.uniform(0.14, 0.2)
        return [(np.array([[-w, -0.5], [w, -0.5], [w, -w], [0.5, -w], [0.5, w], [w, w], [w, 0.5], [-w, 0.5],
                           [-w, w], [-0.5, w], [-0.5, -w], [-w, -w]]), 1)]
    return [(circle, 1), (circle * rng.uniform(0.45, 0.65), 0)]


def _background(rng: np.random.Generator, h: int, w: int, p: ShapesParams) -> np.ndarray:
    g = rng.integers(3, 7)
    field = rng.uniform(0, 255, (g, g, 3)).astype(np.float32)
    img = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(0, p.clutter_lines + 1)):
        a, b = rng.integers(0, (w, h), 2), rng.integers(0, (w, h), 2)
        colour = rng.integers(0, 256, 3).tolist()
        cv2.line(img, tuple(int(x) for x in a), tuple(int(x) for x in b), colour, int(rng.integers(1, 3)),
                 cv2.LINE_AA)
    return img


def draw_shapes(rng: np.random.Generator, img: np.ndarray, p: ShapesParams) -> tuple[np.ndarray, np.ndarray]:
    """Draw up to ``max_objects`` shapes into ``img`` (float32 BGR, in place; a shape that finds no
    place within the occlusion limit in 10 tries is left out).

    Returns labels (n, 5) [class, cx, cy, w, h] normalized, each box the whole shape's tight extent, and the
    fraction of each shape's pixels still visible after the later shapes were drawn.
    """
    h, w = img.shape[:2]
    owner = np.full((h, w), -1, np.int16)  # which object shows at each pixel
    areas: list[int] = []
    labels = []
    short = min(h, w)
    for _ in range(int(rng.integers(1, p.max_objects + 1))):
        cls = int(rng.integers(0, len(NAMES)))
        size = rng.uniform(p.size_min, p.size_max) * short
        aspect, angle = np.sqrt(rng.uniform(0.7, 1.4)), rng.uniform(0, 2 * np.pi)
        for _attempt in range(10):
            centre = rng.uniform((size / 2, size / 2), (w - size / 2, h - size / 2))
            mask = polygon_mask(_outline(cls, rng), (h, w), centre, size, aspect, angle)
            if mask.sum() < 16:
                continue
            if keeps_visible(owner, mask, areas, p.min_visible):
                break
        else:
            continue
        colour = contrasting_colour(rng, img[mask].mean(0), 80)
        x1, y1, x2, y2 = paint(img, mask, colour, (rng.uniform(0.75, 1.0), rng.uniform(1.0, 1.2)))
        owner[mask] = len(areas)
        areas.append(int(mask.sum()))
        labels.append([cls, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
    visible = np.bincount(owner[owner >= 0], minlength=len(areas)) / np.maximum(areas, 1)
    return np.array(labels, np.float32).reshape(-1, 5), visible


def render_image(rng: np.random.Generator, p: ShapesParams) -> tuple[np.ndarray, np.ndarray]:
    """One image (BGR uint8) and its labels (n, 5) [class, cx, cy, w, h] normalized."""
    h, w = (int(x) for x in rng.integers(p.img_min, p.img_max + 1, 2))
    img = _background(rng, h, w, p).astype(np.float32)
    labels, _ = draw_shapes(rng, img, p)
    if rng.random() < p.blur_prob:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.5))
    img += rng.normal(0, p.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), labels


def _write_split(root: Path, split: str, n: int, p: Benchmark) -> None:
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    split_id = {"train": 0, "val": 1}[split]
    lines = []
    for i in tqdm(range(n), desc=f"{p.name} {split}", unit="img", bar_format="{l_bar}{bar:10}{r_bar}",
                  disable=n < 100):
        rng = np.random.default_rng((p.seed, split_id, i))
        img, labels = p.render(rng)
        rel = f"images/{split}/{i:06d}.jpg"
        atomic_write(root / rel, cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, p.quality(rng)])[1])
        rows = "".join(f"{int(c)} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for c, x, y, bw, bh in labels)
        atomic_write(root / "labels" / split / f"{i:06d}.txt", rows)
        lines.append(rel + "\n")
    atomic_write(root / f"{split}.txt", "".join(lines))


def _marker(p) -> str:
    return f"{p.version} {p.digest()}\n"


def _is_dataset(root: Path, p: Benchmark) -> bool:
    """Whether ``root`` holds a complete dataset generated with these parameters."""
    marker = root / "VERSION"
    return marker.is_file() and marker.read_text() == _marker(p) and (root / f"{p.name}.data").is_file()


def _write_dataset(root: Path, p: Benchmark) -> None:
    _write_split(root, "train", p.n_train, p)
    _write_split(root, "val", p.n_val, p)
    atomic_write(root / f"{p.name}.names", "\n".join(p.names) + "\n")
    data = f"classes={len(p.names)}\ntrain=train.txt\nvalid=val.txt\nnames={p.name}.names\n"
    atomic_write(root / f"{p.name}.data", data)
    atomic_write(root / "VERSION", _marker(p))  # written last: a folder with the marker is complete


def _remove_abandoned(root: Path) -> None:
    """Remove the temporary folders of generations that were killed: ``<root>.tmp-<pid>-<hex>`` whose
    process is gone (one still running, e.g. another training rank, keeps its folder)."""
    for tmp in root.parent.glob(f"{glob.escape(root.name)}.tmp-*-*"):
        pid = tmp.name[len(root.name) + 5:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def generate_shapes(root: str | Path, params: Benchmark = DEFAULT_PARAMS) -> Path:
    """Write the dataset to ``root`` (atomically, via a temporary sibling) and return its ``.data`` file.

    An existing ``root`` with the same version marker is reused as is; any other existing ``root`` is
    an error (it is never deleted or overwritten). When another process finishes the same dataset first
    (e.g. several training ranks), its copy is used and this one's temporary folder is removed.
    """
    root = Path(root)
    data_file = root / f"{params.name}.data"
    if root.exists():
        if _is_dataset(root, params):
            return data_file
        raise UserError(f"{root}: exists but is not the {params.name} benchmark {params.version} with these "
                        f"parameters; move it away or choose another --root")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()  # not mkdtemp: the dataset keeps the usual (umask) permissions
    try:
        _write_dataset(tmp, params)
        # written into a temporary folder, renamed once complete; fails when root appeared meanwhile
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # only the temporary folder this call created
        if _is_dataset(root, params):
            return data_file
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return data_file


def ensure_shapes(root: str | Path | None = None, params: Benchmark = DEFAULT_PARAMS) -> Path:
    """The benchmark's ``.data`` file, generating the dataset on first use (default ``datasets/shapes``)."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.exists():
        print(f"generating the built-in {params.name} benchmark in {root} (first use)", flush=True)
    return generate_shapes(root, params)


def build_parser() -> argparse.ArgumentParser:
    from utils.cli import COUNT, SEED, Parser

    ap = Parser(prog="python -m utils.synthetic",
                description="Generate a built-in benchmark dataset (default: datasets/<kind>).")
    ap.add_argument("--kind", choices=list(BUILTIN), default="shapes")
    ap.add_argument("--root", default=None, help="default: datasets/<kind> in the project")
    ap.add_argument("--n-train", type=COUNT, default=None, help="default: the kind's")
    ap.add_argument("--n-val", type=COUNT, default=None, help="default: the kind's")
    ap.add_argument("--seed", type=SEED, default=0)
    return ap


def main(argv: list[str] | None = None) -> Path:
    a = build_parser().parse_args(argv)
    base = BUILTIN[a.kind]
    params = dataclasses.replace(base, n_train=a.n_train or base.n_train, n_val=a.n_val or base.n_val,
                                 seed=a.seed)
    root = Path(a.root) if a.root else DATASETS / a.kind
    data = ensure_shapes(root, params)
    for split in ("train", "val"):
        counts = np.zeros(len(params.names), int)
        for f in sorted((root / "labels" / split).glob("*.txt")):
            for line in f.read_text().splitlines():
                counts[int(line.split()[0])] += 1
        print(f"{split}: " + ", ".join(f"{n} {c}" for n, c in zip(params.names, counts)))
    print(data)
    return data


if __name__ == "__main__":
    from utils.cli import run_cli

    sys.exit(run_cli(main))
