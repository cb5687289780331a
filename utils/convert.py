"""Convert COCO instances JSON or Pascal VOC XML annotations into the project's YOLO layout.

    python -m utils.convert coco --json instances_val2017.json --images val2017 --out my_coco --split val
    python -m utils.convert voc --xml VOC2012/Annotations --images VOC2012/JPEGImages --out my_voc
    python -m utils.convert voc --xml VOC2012 --images VOC2012/JPEGImages --out my_voc --split val

Output in ``--out`` (``<name>`` is the folder's name)::

    images/<split>/    the images, hard-linked (copied where linking fails); inputs are never modified
    labels/<split>/    one ``class cx cy w h`` file per image (normalized); an image without boxes gets
                       an empty file
    <split>.txt        the image list, paths relative to --out (the .data folder), so the folder can move
    <name>.names       class names, one per line
    <name>.data        classes=, train=, valid=, names=, updated by every split converted into the folder;
                       until a val split exists, valid= points at the train list

COCO category ids become 0..C-1 in ascending id order; crowd and zero-size boxes are skipped and counted.
VOC classes are the ``--names`` file's, else those of an earlier split in the same folder, else every name
found in the XML files, sorted. ``--xml`` may be the VOC root (the folder holding ``Annotations``); then
``ImageSets/Main/<split>.txt`` picks the images (``--ids`` names another id list). An existing label
file, image or list is an error unless ``--overwrite``.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.cli import Parser
from utils.errors import UserError
from utils.files import IMG_SUFFIXES, img2label_path, read_names, read_text
from utils.outputs import atomic_path, atomic_write

SPLIT_KEYS = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}  # split -> .data key


@dataclass
class ConvertReport:
    """What one conversion wrote; the skip counts are over the annotations of the images found."""

    images: int = 0
    boxes: int = 0
    crowd_skipped: int = 0
    bad_boxes_skipped: int = 0
    missing_images: int = 0
    difficult: int = 0

    def __str__(self) -> str:
        text = (f"{self.images} images, {self.boxes} boxes written; skipped: {self.crowd_skipped} crowd, "
                f"{self.bad_boxes_skipped} zero-size boxes, {self.missing_images} missing images")
        return text + (f"; {self.difficult} VOC 'difficult' boxes kept" if self.difficult else "")


@dataclass
class _Item:
    src: Path
    rows: list[str]


def _yolo_row(cls: int, x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> str | None:
    """A label row for a pixel box clipped to the image, or None when nothing of it is left."""
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = max(0.0, min(x1, w)), max(0.0, min(x2, w))
    y1, y2 = max(0.0, min(y1, h)), max(0.0, min(y2, h))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"


def _read_names(path: Path) -> list[str] | None:
    return read_names(path) if path.is_file() else None


def _same_content(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def _place_image(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (copy where linking fails); a different file at ``dst`` (a converted
    image of an earlier run, only reached with overwrite) is replaced in one rename."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)  # into a temporary (atomic_path)
        except OSError:
            shutil.copy2(src, tmp)  # into a temporary (atomic_path)


def _destinations(out: Path, split: str, items: list[_Item]) -> list[tuple[Path, Path]]:
    """(image, label) paths in ``out`` for every item; two images sharing a label file is an error."""
    pairs, owner = [], {}
    for it in items:
        img = out / "images" / split / it.src.name
        label = img2label_path(img)
        if label in owner:
            raise UserError(f"{it.src} and {owner[label]} would share the label file {label}: "
                            f"image file names (without suffix) must be unique")
        owner[label] = it.src
        pairs.append((img, label))
    return pairs


def _check_free(out: Path, split: str, items: list[_Item], pairs: list[tuple[Path, Path]]) -> None:
    """Without overwrite: nothing this conversion writes may exist already (identical images may)."""
    hint = "pass --overwrite (overwrite=True) to replace it"
    for it, (img, label) in zip(items, pairs):
        if label.exists():
            raise UserError(f"{label}: exists; {hint}")
        if img.exists() and not _same_content(it.src, img):
            raise UserError(f"{img}: exists and differs from {it.src}; {hint}")
    if (out / f"{split}.txt").exists():
        raise UserError(f"{out / f'{split}.txt'}: split '{split}' was converted here before; {hint}")


def _check_names(names_file: Path, names: list[str], source: Path) -> None:
    """Class names must be non-empty, unique and the same as an earlier split's in the folder."""
    if not all(n and n == n.strip() for n in names):
        raise UserError(f"{source}: class names must be non-empty without surrounding spaces: {names}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{source}: class names repeated: {repeated}")
    old = _read_names(names_file)
    if old is not None and old != names:
        raise UserError(f"{names_file}: an earlier split has {len(old)} classes {old[:5]}, but {source} has "
                        f"{len(names)} {names[:5]}; convert into a new --out folder")


def _update_data_file(data: Path, split: str, classes: int, names_file: Path) -> None:
    """Write ``data`` with this split's list, keeping the other entries of an existing file."""
    entries: dict[str, str] = {}
    if data.exists():
        for line in read_text(data, ".data file").splitlines():
            line = line.split("#", 1)[0]
            if "=" in line:
                k, v = (s.strip() for s in line.split("=", 1))
                entries[k] = v
    entries.update({"classes": str(classes), "names": names_file.name})
    entries[SPLIT_KEYS.get(split, split)] = f"{split}.txt"
    if "valid" not in entries and "train" in entries:
        entries["valid"] = entries["train"]
    order = ["classes", "train", "valid", "names"]
    keys = [k for k in order if k in entries] + [k for k in entries if k not in order]
    atomic_write(data, "".join(f"{k}={entries[k]}\n" for k in keys))


def _write_split(out: Path, split: str, name: str | None, names: list[str], items: list[_Item],
                 source: Path, overwrite: bool) -> Path:
    """Write images, labels, the list file, names and the .data file; returns the .data path.

    Everything is checked before the first file is written, so a refused conversion leaves no trace.
    """
    if not items:
        raise UserError(f"{source}: none of its images were found; check --images")
    name = name or out.resolve().name
    names_file, data = out / f"{name}.names", out / f"{name}.data"
    _check_names(names_file, names, source)
    pairs = _destinations(out, split, items)
    if not overwrite:
        _check_free(out, split, items, pairs)
    for folder in ("images", "labels"):
        (out / folder / split).mkdir(parents=True, exist_ok=True)
    for it, (img, label) in zip(items, pairs):
        _place_image(it.src, img)
        atomic_write(label, "".join(it.rows))
    atomic_write(out / f"{split}.txt", "".join(f"{img.relative_to(out).as_posix()}\n" for img, _ in pairs))
    atomic_write(names_file, "".join(f"{n}\n" for n in names))
    _update_data_file(data, split, len(names), names_file)
    return data


def _require_dir(path: Path, option: str) -> None:
    if not path.is_dir():
        raise UserError(f"{option} {path}: folder not found")


# ---------------------------------------------------------------------------------------------- COCO

@dataclass
class _CocoImage:
    file_name: str
    width: int
    height: int


def _read_coco(path: Path) -> tuple[list[dict], dict[Any, _CocoImage], list[dict]]:
    """Categories sorted by id, images by id and annotations of a COCO instances file, validated."""
    if not path.is_file():
        raise UserError(f"--json {path}: file not found")
    try:
        coco = json.loads(read_text(path, "--json"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    try:
        cats = sorted(({"id": c["id"], "name": str(c["name"]).strip()} for c in coco["categories"]),
                      key=lambda c: c["id"])
        images = {im["id"]: _CocoImage(str(im["file_name"]), int(im["width"]), int(im["height"]))
                  for im in coco["images"]}
        anns = [{"id": a.get("id"), "image_id": a["image_id"], "category_id": a["category_id"],
                 "bbox": [float(v) for v in a["bbox"]], "iscrowd": bool(a.get("iscrowd", 0))}
                for a in coco.get("annotations", [])]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: not a COCO instances file (missing or bad field: {e})") from None
    if not cats:
        raise UserError(f"{path}: no categories")
    if len({c["id"] for c in cats}) != len(cats):
        raise UserError(f"{path}: repeated category ids")
    for image_id, im in images.items():
        if im.width <= 0 or im.height <= 0:
            raise UserError(f"{path}: image {image_id} ({im.file_name}) has size {im.width}x{im.height}")
    for a in anns:
        if len(a["bbox"]) != 4:
            raise UserError(f"{path}: annotation {a['id']}: bbox needs 4 numbers, got {len(a['bbox'])}")
    return cats, images, anns


def convert_coco(json_path: str | Path, images_dir: str | Path, out_dir: str | Path, split: str = "train",
                 name: str | None = None, overwrite: bool = False) -> tuple[Path, ConvertReport]:
    """COCO instances JSON -> YOLO labels in ``out_dir``; returns the .data path and the counts."""
    json_path, images_dir, out = Path(json_path), Path(images_dir), Path(out_dir)
    cats, images, anns = _read_coco(json_path)
    _require_dir(images_dir, "--images")
    index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[Any, list[dict]] = {image_id: [] for image_id in images}
    for a in anns:
        if a["image_id"] not in images or a["category_id"] not in index:
            raise UserError(f"{json_path}: annotation {a['id']} names an unknown image ({a['image_id']}) "
                            f"or category ({a['category_id']})")
        by_image[a["image_id"]].append(a)
    report = ConvertReport()
    items = []
    for image_id, im in images.items():
        src = images_dir / im.file_name
        if not src.is_file():
            report.missing_images += 1
            continue
        rows = []
        for a in by_image[image_id]:
            if a["iscrowd"]:
                report.crowd_skipped += 1
                continue
            x, y, w, h = a["bbox"]
            row = _yolo_row(index[a["category_id"]], x, y, x + w, y + h, im.width, im.height)
            if row is None:
                report.bad_boxes_skipped += 1
            else:
                rows.append(row)
        items.append(_Item(src, rows))
        report.boxes += len(rows)
    report.images = len(items)
    data = _write_split(out, split, name, [c["name"] for c in cats], items, json_path, overwrite)
    return data, report


# ----------------------------------------------------------------------------------------------- VOC

@dataclass
class _VocObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax, 1-based inclusive pixels
    difficult: bool


@dataclass
class _VocFile:
    path: Path
    filename: str
    size: tuple[int, int] | None  # (width, height); None when the XML has no usable <size>
    objects: list[_VocObject]


def _read_voc_xml(path: Path) -> _VocFile:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise UserError(f"{path}: not valid XML ({e})") from None
    size = None
    el = root.find("size")
    if el is not None:
        try:
            w, h = (int(float(el.findtext(k, "0"))) for k in ("width", "height"))
        except ValueError:
            raise UserError(f"{path}: <size> width/height are not numbers") from None
        size = (w, h) if w > 0 and h > 0 else None
    objects = []
    for o in root.iter("object"):
        name = (o.findtext("name") or "").strip()
        if not name:
            raise UserError(f"{path}: an <object> without <name>")
        box = o.find("bndbox")
        try:
            coords = tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise UserError(f"{path}: <object> '{name}' needs a <bndbox> with numeric xmin, ymin, xmax, "
                            f"ymax") from None
        objects.append(_VocObject(name, coords, (o.findtext("difficult") or "0").strip() == "1"))
    filename = (root.findtext("filename") or "").strip() or path.stem + ".jpg"
    return _VocFile(path, filename, size, objects)


def _voc_xml_files(xml_dir: Path, split: str, ids: Path | None) -> list[Path]:
    """The XML files to convert: those named by an id list (``ids``, or a VOC root's
    ``ImageSets/Main/<split>.txt``), else every ``*.xml`` in the folder."""
    ann_dir = xml_dir / "Annotations" if (xml_dir / "Annotations").is_dir() else xml_dir
    _require_dir(ann_dir, "--xml")
    if ids is None and ann_dir != xml_dir:
        candidate = xml_dir / "ImageSets" / "Main" / f"{split}.txt"
        ids = candidate if candidate.is_file() else None
    if ids is None:
        files = sorted(ann_dir.glob("*.xml"))
        if not files:
            raise UserError(f"--xml {ann_dir}: no .xml files")
        return files
    if not ids.is_file():
        raise UserError(f"--ids {ids}: file not found")
    files = []
    for n, line in enumerate(read_text(ids, "--ids list").splitlines(), 1):
        if line.split():
            f = ann_dir / f"{line.split()[0]}.xml"
            if not f.is_file():
                raise UserError(f"{ids}:{n}: {f} not found")
            files.append(f)
    if not files:
        raise UserError(f"{ids}: no image ids")
    return files


def _find_image(images_dir: Path, filename: str, stem: str) -> Path | None:
    """The image an XML names, or one with the XML's stem and any image suffix."""
    src = images_dir / filename
    if src.is_file():
        return src
    return next((p for s in IMG_SUFFIXES if (p := images_dir / (stem + s)).is_file()), None)


def _image_size(voc: _VocFile, src: Path) -> tuple[int, int]:
    if voc.size is not None:
        return voc.size
    import cv2

    img = cv2.imread(str(src))
    if img is None:
        raise UserError(f"{voc.path}: no usable <size>, and the image {src} cannot be read")
    return img.shape[1], img.shape[0]


def convert_voc(xml_dir: str | Path, images_dir: str | Path, out_dir: str | Path, split: str = "train",
                names: list[str] | None = None, name: str | None = None, overwrite: bool = False,
                ids: str | Path | None = None) -> tuple[Path, ConvertReport]:
    """Pascal VOC XML files -> YOLO labels in ``out_dir``; returns the .data path and the counts.

    ``xml_dir`` is the folder of XML files or a VOC root holding ``Annotations`` (see the module notes).
    """
    xml_dir, images_dir, out = Path(xml_dir), Path(images_dir), Path(out_dir)
    files = _voc_xml_files(xml_dir, split, Path(ids) if ids is not None else None)
    _require_dir(images_dir, "--images")
    parsed = [_read_voc_xml(f) for f in files]
    if names is None:
        names = _read_names(out / f"{name or out.resolve().name}.names")  # an earlier split's order
    if names is None:
        names = sorted({o.name for v in parsed for o in v.objects})
    index = {n: i for i, n in enumerate(names)}
    report = ConvertReport()
    items = []
    for voc in parsed:
        unknown = [o.name for o in voc.objects if o.name not in index]
        if unknown:
            raise UserError(f"{voc.path}: class '{unknown[0]}' is not in the names list ({len(names)} "
                            f"names: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        src = _find_image(images_dir, voc.filename, voc.path.stem)
        if src is None:
            report.missing_images += 1
            continue
        w, h = _image_size(voc, src)
        rows = []
        for o in voc.objects:
            x1, y1, x2, y2 = o.box
            row = _yolo_row(index[o.name], x1 - 1, y1 - 1, x2, y2, w, h)  # 1-based inclusive -> 0-based
            if row is None:
                report.bad_boxes_skipped += 1
            else:
                rows.append(row)
                report.difficult += o.difficult
        items.append(_Item(src, rows))
        report.boxes += len(rows)
    report.images = len(items)
    source = files[0].parent
    data = _write_split(out, split, name, names, items, source, overwrite)
    return data, report


# ----------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> Path:
    p = Parser(prog="python -m utils.convert",
               description=__doc__)
    sub = p.add_subparsers(dest="format", required=True)
    c = sub.add_parser("coco", help="COCO instances JSON")
    c.add_argument("--json", required=True, help="instances_*.json")
    v = sub.add_parser("voc", help="Pascal VOC XML folder or VOC root")
    v.add_argument("--xml", required=True, help="the Annotations folder, or the VOC root holding it")
    v.add_argument("--names", default=None, help="names file fixing the class order")
    v.add_argument("--ids", default=None, help="image id list (default with a VOC root: "
                                               "ImageSets/Main/<split>.txt)")
    for s in (c, v):
        s.add_argument("--images", required=True, help="folder of the images the annotations name")
        s.add_argument("--out", required=True, help="dataset folder to write (created if needed)")
        s.add_argument("--split", default="train", choices=sorted(SPLIT_KEYS))
        s.add_argument("--name", default=None, help="stem of the .data and .names files (default: the "
                                                    "--out folder's name)")
        s.add_argument("--overwrite", "--exist-ok", action="store_true",
                       help="replace labels of an earlier conversion")
    a = p.parse_args(argv)
    if a.format == "coco":
        data, report = convert_coco(a.json, a.images, a.out, a.split, a.name, a.overwrite)
    else:
        names = None
        if a.names:
            names = read_names(a.names, "--names")
            if not names:
                raise UserError(f"--names {a.names}: the file is empty")
        data, report = convert_voc(a.xml, a.images, a.out, a.split, names, a.name, a.overwrite, a.ids)
    print(f"{report}\nwrote {data}")
    return data


if __name__ == "__main__":
    from utils.cli import run_cli

    sys.exit(run_cli(main))
