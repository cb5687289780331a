"""File-system conventions shared by the scripts: media suffixes, label paths, run folders."""

from __future__ import annotations

from pathlib import Path

IMG_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv")


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMG_SUFFIXES


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def img2label_path(img_path: str | Path) -> Path:
    """The YOLO label file of an image: the last ``images`` folder becomes ``labels``, suffix ``.txt``.

    An image outside any ``images`` folder keeps its label beside it (``a/b.jpg`` -> ``a/b.txt``).
    """
    p = Path(img_path)
    parts = list(p.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def new_run_dir(root: str | Path, name: str, exist_ok: bool = False) -> Path:
    """Create and return ``root/name``; if it exists, ``root/name2``, ``root/name3``, ... (never emptied).

    With ``exist_ok`` an existing ``root/name`` is returned as it is (its files are left alone).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    candidate = root / name
    if exist_ok:
        candidate.mkdir(exist_ok=True)
        return candidate
    n = 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = root / f"{name}{n}"


def read_names(path: str | Path, what: str = "names file") -> list[str]:
    """Class names, one per line (blank lines ignored); a missing file is an error naming ``what``."""
    from utils.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]
