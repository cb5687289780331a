"""Convert COCO instances JSON or Pascal VOC XML annotations into the project's YOLO layout.

    python -m utils.convert coco --json instances_val2017.json --images val2017 --out my_coco --split val
    python -m utils.convert voc --xml VOC2012/Annotations --images VOC2012/JPEGImages --out my_voc

Output: ``out/images/<split>/`` (hard links, copies where linking fails), ``out/labels/<split>/*.txt``,
``out/<split>.txt`` (paths relative to ``out``), ``out/<name>.names`` and ``out/<name>.data``. Inputs are
never modified; an existing label file is an error unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError


@dataclass
class ConvertReport:
    images: int = 0
    boxes: int = 0
    crowd_skipped: int = 0
    bad_boxes_skipped: int = 0
    missing_images: int = 0
    difficult: int = 0

    def __str__(self) -> str:
        return (f"{self.images} images, {self.boxes} boxes; skipped: {self.crowd_skipped} crowd, "
                f"{self.bad_boxes_skipped} zero-size boxes, {self.missing_images} missing images; "
                f"{self.difficult} VOC 'difficult' boxes kept")


def _yolo_row(cls: int, x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> str | None:
    x1, x2 = max(0.0, min(x1, w)), max(0.0, min(x2, w))
    y1, y2 = max(0.0, min(y1, h)), max(0.0, min(y2, h))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"


def _place_image(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_split(out: Path, split: str, name: str, names: list[str], items: list[tuple[Path, list[str]]],
                 overwrite: bool) -> Path:
    """Write images, labels, the list file, names and a .data listing every split written so far."""
    lines = []
    for src, rows in items:
        img = out / "images" / split / src.name
        label = out / "labels" / split / (src.stem + ".txt")
        if label.exists() and not overwrite:
            raise UserError(f"{label}: exists; pass --overwrite to replace converted labels")
        _place_image(src, img)
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(rows))
        lines.append(str(img.relative_to(out)))
    (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    names_file = out / f"{name}.names"
    names_file.write_text("\n".join(names) + "\n")
    data = out / f"{name}.data"
    entries = {}
    if data.exists():
        for line in data.read_text().splitlines():
            if "=" in line:
                k, v = (s.strip() for s in line.split("=", 1))
                entries[k] = v
    entries.update({"classes": str(len(names)), "names": names_file.name})
    entries["train" if split == "train" else "valid"] = f"{split}.txt"
    entries.setdefault("valid", entries.get("train", f"{split}.txt"))
    data.write_text("".join(f"{k}={v}\n" for k, v in entries.items()))
    return data


def convert_coco(json_path: str | Path, images_dir: str | Path, out_dir: str | Path, split: str = "train",
                 name: str | None = None, overwrite: bool = False) -> tuple[Path, ConvertReport]:
    """COCO instances JSON -> YOLO labels; category ids become 0..C-1 in ascending id order."""
    json_path, images_dir, out = Path(json_path), Path(images_dir), Path(out_dir)
    if not json_path.is_file():
        raise UserError(f"--json {json_path}: file not found")
    try:
        coco = json.loads(json_path.read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        images = coco["images"]
        anns = coco.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{json_path}: not a COCO instances file ({e})") from None
    index = {c["id"]: i for i, c in enumerate(cats)}
    rows: dict[int, list[str]] = {img["id"]: [] for img in images}
    report = ConvertReport()
    by_id = {img["id"]: img for img in images}
    for a in anns:
        if a.get("iscrowd", 0):
            report.crowd_skipped += 1
            continue
        img = by_id.get(a["image_id"])
        if img is None or a["category_id"] not in index:
            raise UserError(f"{json_path}: annotation {a.get('id')} names an unknown image or category")
        x, y, w, h = a["bbox"]
        row = _yolo_row(index[a["category_id"]], x, y, x + w, y + h, img["width"], img["height"])
        if row is None:
            report.bad_boxes_skipped += 1
            continue
        rows[img["id"]].append(row)
    items = []
    for img in images:
        src = images_dir / img["file_name"]
        if not src.is_file():
            report.missing_images += 1
            continue
        items.append((src, rows[img["id"]]))
        report.images += 1
        report.boxes += len(rows[img["id"]])
    data = _write_split(out, split, name or out.name, [c["name"] for c in cats], items, overwrite)
    return data, report


def convert_voc(xml_dir: str | Path, images_dir: str | Path, out_dir: str | Path, split: str = "train",
                names: list[str] | None = None, name: str | None = None, overwrite: bool = False
                ) -> tuple[Path, ConvertReport]:
    """Pascal VOC XML files -> YOLO labels. Without ``names`` the classes are all names found, sorted."""
    xml_dir, images_dir, out = Path(xml_dir), Path(images_dir), Path(out_dir)
    files = sorted(xml_dir.glob("*.xml")) if xml_dir.is_dir() else []
    if not files:
        raise UserError(f"--xml {xml_dir}: no .xml files")
    parsed = []
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            raise UserError(f"{f}: not valid XML ({e})") from None
        size = root.find("size")
        if size is None:
            raise UserError(f"{f}: no <size> element")
        w, h = int(float(size.findtext("width", "0"))), int(float(size.findtext("height", "0")))
        if w <= 0 or h <= 0:
            raise UserError(f"{f}: <size> has no positive width and height")
        objs = []
        for o in root.iter("object"):
            box = o.find("bndbox")
            if box is None:
                raise UserError(f"{f}: an <object> without <bndbox>")
            coords = [float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")]
            objs.append((o.findtext("name", "").strip(), coords, o.findtext("difficult", "0").strip() == "1"))
        parsed.append((f, root.findtext("filename") or f.stem + ".jpg", w, h, objs))
    if names is None:
        names = sorted({n for *_, objs in parsed for n, _, _ in objs})
    index = {n: i for i, n in enumerate(names)}
    report = ConvertReport()
    items = []
    for f, filename, w, h, objs in parsed:
        rows = []
        for n, (x1, y1, x2, y2), difficult in objs:
            if n not in index:
                raise UserError(f"{f}: class '{n}' is not in the names list")
            row = _yolo_row(index[n], x1 - 1, y1 - 1, x2, y2, w, h)  # VOC pixels are 1-based, inclusive
            if row is None:
                report.bad_boxes_skipped += 1
                continue
            report.difficult += difficult
            rows.append(row)
        src = images_dir / filename
        if not src.is_file():
            report.missing_images += 1
            continue
        items.append((src, rows))
        report.images += 1
        report.boxes += len(rows)
    data = _write_split(out, split, name or out.name, names, items, overwrite)
    return data, report


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True)
    c = sub.add_parser("coco", help="COCO instances JSON")
    c.add_argument("--json", required=True)
    v = sub.add_parser("voc", help="Pascal VOC XML folder")
    v.add_argument("--xml", required=True)
    v.add_argument("--names", default=None, help="names file fixing the class order")
    for s in (c, v):
        s.add_argument("--images", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--split", default="train", choices=["train", "val"])
        s.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.format == "coco":
        data, report = convert_coco(a.json, a.images, a.out, a.split, overwrite=a.overwrite)
    else:
        names = None
        if a.names:
            nf = Path(a.names)
            if not nf.is_file():
                raise UserError(f"--names {nf}: file not found")
            names = [s.strip() for s in nf.read_text().splitlines() if s.strip()]
        data, report = convert_voc(a.xml, a.images, a.out, a.split, names, overwrite=a.overwrite)
    print(f"{report}\nwrote {data}")
    return data


if __name__ == "__main__":
    from utils.cli import run_cli

    sys.exit(run_cli(main))
