"""Detection datasets: darknet ``.data`` files, image lists, validated YOLO labels, a label cache,
and the training/evaluation dataset with mosaic, affine, HSV and flip augmentation.

A batch from :func:`collate` is ``(imgs, targets, paths, shapes)``: ``imgs`` uint8 (B, 3, H, W) RGB;
``targets`` float32 (N, 6) rows ``[image index, class, cx, cy, w, h]`` normalized to the batch image;
``shapes`` per image ``((h0, w0), ((ratio_w, ratio_h), (pad_w, pad_h)))`` to map boxes back to the
original image (``None`` for mosaic images).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.augment import PAD_VALUE, augment_hsv, letterbox, random_affine
from utils.boxes import xywh2xyxy, xyxy2xywh
from utils.errors import UserError
from utils.files import IMG_SUFFIXES, image_damage, img2label_path, is_image, read_names, read_text
from utils.outputs import atomic_write

CACHE_VERSION = 2
WARNINGS_SHOWN = 10  # per dataset; the summary still counts every problem


@dataclass
class DataConfig:
    """A parsed darknet ``.data`` file; relative paths are resolved against its folder."""

    path: Path
    classes: int
    train: Path | None
    valid: Path | None
    names: list[str]
    extra: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> Path:
        """The image list or folder of ``train`` or ``valid``/``val``/``test``."""
        p = self.train if name == "train" else self.valid
        if p is None:
            key = "train" if name == "train" else "valid"
            raise UserError(f"{self.path}: no '{key}=' entry")
        return p


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    beside = base / p
    return beside if beside.exists() or not p.exists() else p  # darknet resolves against the cwd


def resolve_data(data: str | Path) -> Path:
    """``--data``: a .data file, a built-in benchmark's name (``shapes-hard``), or empty for the default
    built-in benchmark; a built-in one is generated on first use."""
    from utils.synthetic import builtin_params, ensure_shapes

    if not data:
        return ensure_shapes()
    builtin = builtin_params(data) if not Path(data).is_file() else None
    return ensure_shapes(*builtin) if builtin is not None else Path(data)


def read_data_file(path: str | Path) -> DataConfig:
    """Parse ``classes=``, ``train=``, ``valid=`` (or ``val=``), ``names=``; others are kept in ``extra``."""
    path = Path(path)
    if not path.is_file():
        from utils.synthetic import BUILTIN, DATASETS, builtin_params, ensure_shapes

        builtin = builtin_params(path)
        if builtin is not None:  # a built-in benchmark's name or documented path: made on first use
            path = ensure_shapes(*builtin)
        elif path.suffix == ".data" and path.stem in BUILTIN:
            raise UserError(f"{path}: .data file not found (the built-in benchmarks are made on first use "
                            f"at {DATASETS}/<name>/<name>.data, or by --data <name>: "
                            f"{', '.join(BUILTIN)})")
        else:
            raise UserError(f"{path}: .data file not found")
    entries: dict[str, str] = {}
    for n, raw in enumerate(read_text(path, ".data file").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise UserError(f"{path}:{n}: expected 'key=value', got {raw.strip()!r}")
        k, v = (s.strip() for s in line.split("=", 1))
        entries[k] = v
    base = path.parent
    if "classes" not in entries:
        raise UserError(f"{path}: missing 'classes=' entry")
    try:
        classes = int(entries.pop("classes"))
    except ValueError:
        raise UserError(f"{path}: 'classes' must be an integer") from None
    if classes < 1:
        raise UserError(f"{path}: 'classes' must be at least 1, got {classes}")
    train = _resolve(entries.pop("train"), base) if "train" in entries else None
    valid_key = "valid" if "valid" in entries else "val" if "val" in entries else None
    valid = _resolve(entries.pop(valid_key), base) if valid_key else None
    if "names" in entries:
        names_file = _resolve(entries.pop("names"), base)
        names = read_names(names_file, f"{path}: names file")
        if len(names) != classes:
            raise UserError(f"{path}: classes={classes} but {names_file} has {len(names)} names")
    else:
        names = [f"class{i}" for i in range(classes)]
    return DataConfig(path, classes, train, valid, names, entries)


def list_images(source: str | Path) -> list[Path]:
    """The images of a folder (recursive, sorted), a list file (paths relative to it) or one image."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMG_SUFFIXES)
    elif source.is_file() and is_image(source):
        files = [source]
    elif source.is_file():
        files = []
        for line in read_text(source, "image list").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                files.append(_resolve(line, source.parent))
    else:
        raise UserError(f"{source}: image list or folder not found")
    if not files:
        raise UserError(f"{source}: no images (looked for {', '.join(IMG_SUFFIXES)})")
    return files


def parse_label_file(path: Path, classes: int) -> tuple[np.ndarray, list[str]]:
    """Rows ``class cx cy w h`` (normalized). Bad rows are dropped; returns (labels (n, 5), warnings)."""
    rows, warnings = [], []
    for n, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        parts = raw.split()
        if not parts:
            continue
        where = f"{path}:{n}"
        if len(parts) != 5:
            warnings.append(f"{where}: expected 5 columns, got {len(parts)}")
            continue
        try:
            vals = [float(x) for x in parts]
        except ValueError:
            warnings.append(f"{where}: not a number in {raw.strip()!r}")
            continue
        c, w, h = vals[0], vals[3], vals[4]
        if not math.isfinite(c) or c != int(c) or not 0 <= c < classes:
            warnings.append(f"{where}: class {parts[0]} outside 0..{classes - 1}")
        elif not all(math.isfinite(v) for v in vals[1:]) or min(vals[1:]) < 0 or max(vals[1:]) > 1:
            warnings.append(f"{where}: coordinates outside [0, 1]")
        elif w <= 0 or h <= 0:
            warnings.append(f"{where}: zero-size box")
        else:
            rows.append(vals)
    return np.array(rows, dtype=np.float32).reshape(-1, 5), warnings


@dataclass
class LabelSet:
    """The validated contents of one split: readable images, their sizes and labels, and the counts."""

    images: list[Path]
    shapes: np.ndarray  # (n, 2) original (width, height)
    labels: list[np.ndarray]  # (k, 5) class, cx, cy, w, h normalized
    bad_rows: int = 0
    bad_images: int = 0
    missing_labels: int = 0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        boxes = sum(len(x) for x in self.labels)
        return (f"{len(self.images)} images, {boxes} boxes, {self.missing_labels} without labels, "
                f"{self.bad_rows} bad label rows dropped, {self.bad_images} unreadable images skipped")


def _fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha1(str(CACHE_VERSION).encode())
    for f in files:
        for p in (f, img2label_path(f)):
            try:
                st = p.stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{p}|missing".encode())
    return h.hexdigest()


def _scan(files: list[Path], classes: int) -> LabelSet:
    out = LabelSet([], np.zeros((0, 2), np.int64), [])
    shapes = []
    for f in files:
        damage = image_damage(f)
        img = None if damage else cv2.imread(str(f))  # decoding is the only reliable readability check
        if img is None:
            out.bad_images += 1
            out.warnings.append(f"{f}: {damage or 'unreadable image'}, skipped")
            continue
        lf = img2label_path(f)
        if lf.is_file():
            labels, warnings = parse_label_file(lf, classes)
            out.bad_rows += len(warnings)
            out.warnings += warnings
        else:
            labels = np.zeros((0, 5), np.float32)
            out.missing_labels += 1
        out.images.append(f)
        shapes.append((img.shape[1], img.shape[0]))
        out.labels.append(labels)
    out.shapes = np.array(shapes, dtype=np.int64).reshape(-1, 2)
    return out


def cache_root() -> Path:
    """The folder of label caches: ``$YOLO_COMPRESS_CACHE``, else ``$XDG_CACHE_HOME/yolo-compress``
    (``~/.cache/yolo-compress``). Caches never go beside a user's files: a ``.data`` entry may name any
    file (``train=/etc/passwd``), and writing beside it would write anywhere."""
    env = os.environ.get("YOLO_COMPRESS_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yolo-compress"


def cache_path(source: Path) -> Path:
    """The label cache of an image list or folder: one file per source path in :func:`cache_root`."""
    digest = hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:20]
    return cache_root() / "labels" / f"{Path(source).name[:40]}-{digest}.npz"


def _save_cache(path: Path, key: str, classes: int, labels: LabelSet) -> None:
    """Plain arrays only (no pickle): strings as fixed-width unicode, the labels concatenated."""
    arrays = {
        "version": np.array(CACHE_VERSION), "key": np.array(key), "classes": np.array(classes),
        "images": np.array([str(p) for p in labels.images], dtype=str),
        "shapes": labels.shapes.astype(np.int64).reshape(-1, 2),
        "counts": np.array([len(x) for x in labels.labels], dtype=np.int64),
        "labels": np.concatenate([*labels.labels, np.zeros((0, 5), np.float32)]).astype(np.float32),
        "stats": np.array([labels.bad_rows, labels.bad_images, labels.missing_labels], dtype=np.int64),
        "warnings": np.array(labels.warnings, dtype=str)}

    def write(f) -> None:
        np.savez(f, **arrays)  # into a temporary file that atomic_write renames

    atomic_write(path, write)


class _BadCache(Exception):
    pass


def _load_cache(path: Path, key: str, classes: int) -> LabelSet | None:
    """The cached labels if ``path`` is a valid cache for ``key`` and ``classes``; None if it is for
    other files (stale). A cache that is not one (damaged, foreign, tampered) raises _BadCache; it is
    never unpickled, so it cannot run code."""
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
    except Exception as e:
        raise _BadCache(f"not a readable cache ({type(e).__name__})") from None
    need = {"version": "i", "key": "U", "classes": "i", "images": "U", "shapes": "i", "counts": "i",
            "labels": "f", "stats": "i", "warnings": "U"}
    for k, kind in need.items():
        if k not in a or a[k].dtype.kind != kind:
            raise _BadCache(f"entry '{k}' missing or of the wrong type")
    if int(a["version"]) != CACHE_VERSION or str(a["key"]) != key or int(a["classes"]) != classes:
        return None
    images, shapes, counts, rows = a["images"], a["shapes"], a["counts"], a["labels"]
    n = len(images)
    ok = (images.ndim == 1 and shapes.shape == (n, 2) and counts.shape == (n,) and rows.ndim == 2
          and rows.shape[1] == 5 and (counts >= 0).all() and int(counts.sum()) == len(rows)
          and a["stats"].shape == (3,) and (shapes > 0).all() and np.isfinite(rows).all()
          and ((rows[:, 0] >= 0) & (rows[:, 0] < classes) & (rows[:, 0] == rows[:, 0].round())).all()
          and ((rows[:, 1:] >= 0) & (rows[:, 1:] <= 1)).all())
    if not ok:
        raise _BadCache("inconsistent contents")
    ends = np.cumsum(counts)
    labels = [rows[e - c:e] for c, e in zip(counts, ends)]
    bad_rows, bad_images, missing = (int(v) for v in a["stats"])
    return LabelSet([Path(str(p)) for p in images], shapes, labels, bad_rows, bad_images, missing,
                    [str(w) for w in a["warnings"]])


def load_labels(source: str | Path, classes: int, verbose: bool = True, need_boxes: bool = False
                ) -> LabelSet:
    """Validated labels of every image in ``source``, from the cache when no file changed since.

    With ``need_boxes`` (training, evaluation) a split without a single valid box is an error.
    """
    source = Path(source)
    files = list_images(source)
    key = _fingerprint(files)
    cache = cache_path(source)
    labels = None
    if cache.is_file():
        try:
            labels = _load_cache(cache, key, classes)
        except _BadCache as e:
            print(f"warning: label cache {cache}: {e}; rebuilding it", file=sys.stderr)
    if labels is None:
        labels = _scan(files, classes)
        try:
            _save_cache(cache, key, classes, labels)
        except (OSError, UserError) as e:
            print(f"warning: cannot write label cache {cache}: {e}", file=sys.stderr)
    if verbose:
        for w in labels.warnings[:WARNINGS_SHOWN]:
            print(f"warning: {w}", file=sys.stderr)
        if len(labels.warnings) > WARNINGS_SHOWN:
            print(f"warning: ... {len(labels.warnings) - WARNINGS_SHOWN} more", file=sys.stderr)
        print(f"{source}: {labels.summary()}")
    if not labels.images:
        raise UserError(f"{source}: no readable images ({labels.summary()})")
    if need_boxes and not any(len(x) for x in labels.labels):
        where = img2label_path(labels.images[0]).parent
        raise UserError(f"{source}: not a single valid label row ({labels.summary()}); the labels of "
                        f"{labels.images[0]} are expected in {where}")
    return labels


def split_labels(data_file: str | Path, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image sizes (n, 2) as (width, height) and validated labels of one split of a ``.data`` file."""
    data = read_data_file(data_file)
    labels = load_labels(data.split(split), data.classes)
    return labels.shapes, labels.labels


DEFAULT_AUGMENT = {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1,
                   "scale": 0.5, "shear": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0}


class YoloDataset(Dataset):
    """Images and labels of one split, letterboxed (or mosaicked when augmenting) to ``img_size``.

    With ``rect`` the images are ordered by aspect ratio and each batch gets the smallest stride-multiple
    shape that holds its images (evaluation). Augmentation randomness comes from ``seed``, the epoch
    (:meth:`set_epoch`) and the index, so a run can be repeated and resumed exactly.
    """

    def __init__(self, labels: LabelSet, img_size: int = 256, batch_size: int = 16, augment: bool = False,
                 hyp: dict | None = None, rect: bool = False, stride: int = 32, pad: float = 0.0,
                 seed: int = 0, cache_images: bool = False):
        self.img_size, self.augment, self.stride, self.seed = img_size, augment, stride, seed
        self.hyp = {**DEFAULT_AUGMENT, **(hyp or {})}
        self.rect, self.batch_size = rect, batch_size
        self.epoch = 0
        order = np.arange(len(labels.images))
        self.batch_shapes = None
        if rect:
            ar = labels.shapes[:, 1] / labels.shapes[:, 0]  # h / w
            order = np.argsort(ar, kind="stable")
            self.batch_shapes = self._batch_shapes(ar[order], batch_size, img_size, stride, pad)
        self.files = [labels.images[i] for i in order]
        self.shapes = labels.shapes[order]
        self.labels = [labels.labels[i] for i in order]
        self._cache: list[tuple[np.ndarray, tuple[int, int]] | None] = [None] * len(self.files)
        if cache_images:  # loaded before workers fork, so they share it
            self._cache = [self.load_image(i) for i in range(len(self.files))]

    @staticmethod
    def _batch_shapes(ar: np.ndarray, batch_size: int, img_size: int, stride: int,
                      pad: float) -> np.ndarray:
        n_batches = math.ceil(len(ar) / batch_size)
        shapes = np.ones((n_batches, 2))
        for b in range(n_batches):
            a = ar[b * batch_size:(b + 1) * batch_size]
            if a.max() < 1:
                shapes[b] = (a.max(), 1)  # (h, w) relative to img_size
            elif a.min() > 1:
                shapes[b] = (1, 1 / a.min())
        return (np.ceil(shapes * img_size / stride + pad) * stride).astype(int)

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index))

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The BGR image resized so its long side is ``img_size``, and its original (h, w)."""
        cached = self._cache[i]
        if cached is not None:
            return cached
        img = cv2.imread(str(self.files[i]))
        if img is None:
            raise UserError(f"{self.files[i]}: image became unreadable after the label scan")
        h0, w0 = img.shape[:2]
        r = self.img_size / max(h0, w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if r > 1 or self.augment else cv2.INTER_AREA
            img = cv2.resize(img, (max(1, round(w0 * r)), max(1, round(h0 * r))), interpolation=interp)
        return img, (h0, w0)

    def _pixel_labels(self, i: int, w: float, h: float, padw: float = 0, padh: float = 0) -> np.ndarray:
        lab = self.labels[i].copy()
        if len(lab):
            lab[:, 1:] = xywh2xyxy(lab[:, 1:]) * (w, h, w, h) + (padw, padh, padw, padh)
        return lab

    def _mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s = self.img_size
        yc, xc = (int(rng.uniform(0.5 * s, 1.5 * s)) for _ in range(2))
        canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, np.uint8)
        indices = [index, *rng.integers(0, len(self), 3).tolist()]
        parts = []
        for k, i in enumerate(indices):
            img, _ = self.load_image(i)
            h, w = img.shape[:2]
            if k == 0:  # top left
                x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
                x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
            elif k == 1:  # top right
                x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
                x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), x2a - x1a, h
            elif k == 2:  # bottom left
                x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
                x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, y2a - y1a
            else:  # bottom right
                x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
                x1b, y1b, x2b, y2b = 0, 0, x2a - x1a, y2a - y1a
            canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
            lab = self._pixel_labels(i, w, h, x1a - x1b, y1a - y1b)
            if len(lab):  # clip to the visible tile; the affine step drops boxes that lost most area
                lab[:, [1, 3]] = lab[:, [1, 3]].clip(x1a, x2a)
                lab[:, [2, 4]] = lab[:, [2, 4]].clip(y1a, y2a)
            parts.append(lab)
        labels = np.concatenate(parts, 0)
        hy = self.hyp
        return random_affine(canvas, labels, rng, (s, s), hy["degrees"], hy["translate"], hy["scale"],
                             hy["shear"])

    def __getitem__(self, index: int):
        rng = self._rng(index)
        hy = self.hyp
        shapes = None
        if self.augment and rng.random() < hy["mosaic"]:
            img, labels = self._mosaic(index, rng)
        else:
            img, (h0, w0) = self.load_image(index)
            h, w = img.shape[:2]
            shape = self.batch_shapes[index // self.batch_size] if self.rect else self.img_size
            img, (rw, rh), pad = letterbox(img, shape, auto=False, scaleup=self.augment)
            shapes = ((h0, w0), ((w / w0 * rw, h / h0 * rh), pad))
            labels = self._pixel_labels(index, w * rw, h * rh, pad[0], pad[1])
            if self.augment:
                img, labels = random_affine(img, labels, rng, img.shape[:2], hy["degrees"], hy["translate"],
                                            hy["scale"], hy["shear"])
        if self.augment:
            augment_hsv(img, rng, hy["hsv_h"], hy["hsv_s"], hy["hsv_v"])
        h, w = img.shape[:2]
        out = np.zeros((len(labels), 6), np.float32)
        if len(labels):
            out[:, 1] = labels[:, 0]
            out[:, 2:] = xyxy2xywh(labels[:, 1:5]) / (w, h, w, h)
        if self.augment and rng.random() < hy["fliplr"]:
            img = img[:, ::-1]
            out[:, 2] = 1 - out[:, 2]
        if self.augment and rng.random() < hy["flipud"]:
            img = img[::-1]
            out[:, 3] = 1 - out[:, 3]
        img = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
        return torch.from_numpy(img), torch.from_numpy(out), str(self.files[index]), shapes


def collate(batch):
    imgs, targets, paths, shapes = zip(*batch)
    for i, t in enumerate(targets):
        t[:, 0] = i
    return torch.stack(imgs, 0), torch.cat(targets, 0), list(paths), list(shapes)


def create_dataloader(source: str | Path, classes: int, img_size: int, batch_size: int, stride: int = 32,
                      augment: bool = False, hyp: dict | None = None, rect: bool = False, workers: int = 0,
                      shuffle: bool = False, seed: int = 0, rank: int = -1, world_size: int = 1,
                      cache_images: bool = False, verbose: bool = True, need_boxes: bool = False
                      ) -> tuple[DataLoader, YoloDataset]:
    """A loader over one split. With ``world_size`` > 1 each rank reads its own shard; ``need_boxes``:
    a split without a single valid box is an error (training and evaluation, not calibration).

    The order depends only on ``seed`` and the epoch given to :func:`set_epoch`, so an interrupted run
    resumes with the batches it would have seen.
    """
    labels = load_labels(source, classes, verbose=verbose, need_boxes=need_boxes)
    ds = YoloDataset(labels, img_size, batch_size, augment, hyp, rect, stride, seed=seed,
                     cache_images=cache_images)
    sampler = DistributedSampler(ds, max(world_size, 1), max(rank, 0), shuffle=shuffle, seed=seed)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                        drop_last=False)
    return loader, ds


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the loader's order and augmentation those of ``epoch`` (workers start fresh each epoch)."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
