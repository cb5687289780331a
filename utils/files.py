"""File-system conventions shared by the scripts: media suffixes, label paths, run folders, reading a
user's text files, and telling a damaged image from a readable one."""

from __future__ import annotations

from pathlib import Path

from utils.errors import UserError

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


def next_run_dir(root: str | Path, name: str, exist_ok: bool = False) -> Path:
    """``root/name`` if it is free (or ``exist_ok``), else the first free ``root/name2``, ``name3``, ...
    (nothing is created)."""
    root = Path(root)
    candidate, n = root / name, 1
    while not exist_ok and candidate.exists():
        n += 1
        candidate = root / f"{name}{n}"
    return candidate


def new_run_dir(root: str | Path, name: str, exist_ok: bool = False) -> Path:
    """Create and return ``root/name``; if it exists, ``root/name2``, ``root/name3``, ... (never emptied).

    With ``exist_ok`` an existing ``root/name`` is returned as it is (its files are left alone).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = next_run_dir(root, name, exist_ok)
        try:
            candidate.mkdir(exist_ok=exist_ok)
            return candidate
        except FileExistsError:  # another process took it meanwhile
            continue


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """A user's file; a missing or unreadable one is one UserError naming ``what`` and the file."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path}: file not found") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """A user's text file as UTF-8 (a BOM is dropped). A missing or unreadable file, or bytes that are not
    UTF-8, are one UserError naming the file and the line."""
    path = Path(path)
    raw = read_bytes(path, what)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the {what} as "
                        f"UTF-8") from None


def read_names(path: str | Path, what: str = "names file") -> list[str]:
    """Class names, one per line (blank lines ignored); a missing file is an error naming ``what``."""
    return [s.strip() for s in read_text(path, what).splitlines() if s.strip()]


def image_damage(path: str | Path) -> str | None:
    """Why an image file cannot be trusted, or None. A JPEG must end with its end-of-image marker: a
    truncated one still decodes (libjpeg fills the rest with grey and warns without naming the file)."""
    path = Path(path)
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return None
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64))
            tail = f.read()
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if not tail.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    return None
