"""Inference sources: an image, a folder, a glob, a video, a webcam index, a stream URL or a .txt list.

``open_source`` checks the source at once (missing paths, empty folders and bad list lines are
errors before any frame is read) and returns an iterable of ``Frame``s, each carrying the original
BGR image and the letterboxed RGB CHW uint8 array the network takes.
"""

from __future__ import annotations

import glob as globlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from utils.augment import letterbox
from utils.errors import UserError
from utils.files import image_damage, is_image, is_video, read_text

STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")
DEFAULT_FPS = 30.0  # when a webcam or stream does not report its frame rate


@dataclass
class Frame:
    path: str  # the file, or the stream URL / webcam index
    index: int  # frame number within a video or stream; 0 for images
    image: np.ndarray  # original BGR (h, w, 3) uint8
    letterboxed: np.ndarray  # RGB (3, H, W) uint8, contiguous: the network input before /255
    ratio: tuple[float, float]  # (rw, rh) from the original to the letterboxed image
    pad: tuple[float, float]  # (padw, padh) added on the left and top
    is_video: bool = False
    fps: float = 0.0  # videos and streams only
    video_size: tuple[int, int] | None = None  # (width, height) of a video or stream

    @property
    def stem(self) -> str:
        return output_stem(self.path)


def output_stem(source: str) -> str:
    """A file-name stem for the outputs of a source: the file's stem, ``webcam0``, or a URL's last part."""
    if source.isdigit():
        return f"webcam{source}"
    return Path(source.rstrip("/")).stem or "stream"


def is_stream(source: str) -> bool:
    """A webcam index ("0") or a stream URL, both opened with cv2.VideoCapture."""
    return source.isdigit() or source.lower().startswith(STREAM_PREFIXES)


def _media(files: list[str]) -> list[str]:
    return sorted(f for f in files if Path(f).is_file() and (is_image(f) or is_video(f)))


def _read_list(path: Path) -> list[str]:
    """The entries of a .txt list, relative ones resolved against the list's folder."""
    items = []
    for n, line in enumerate(read_text(path, "--source list").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_stream(line):
            items.append(line)
            continue
        f = Path(line) if Path(line).is_absolute() else path.parent / line
        if not f.is_file():
            raise UserError(f"{path}:{n}: {f} not found")
        if not (is_image(f) or is_video(f)):
            raise UserError(f"{path}:{n}: {f} is not an image or video (by its suffix)")
        items.append(str(f))
    if not items:
        raise UserError(f"--source {path}: the list names no images or videos")
    return items


def expand_source(source: str) -> list[str]:
    """The media files or stream names a --source stands for, in order (folders and globs sorted)."""
    if is_stream(source):
        return [source]
    if any(ch in source for ch in "*?["):
        files = _media(globlib.glob(source, recursive=True))
        if not files:
            raise UserError(f"--source {source}: the pattern matches no images or videos")
        return files
    p = Path(source)
    if p.is_dir():
        files = _media([str(f) for f in p.iterdir()])
        if not files:
            raise UserError(f"--source {source}: the folder has no images or videos")
        return files
    if not p.exists():
        raise UserError(f"--source {source}: not found")
    if p.suffix.lower() == ".txt":
        return _read_list(p)
    if not (is_image(p) or is_video(p)):
        raise UserError(f"--source {source}: not an image, video, folder, glob, .txt list, webcam index "
                        f"or stream URL")
    return [source]


@dataclass
class MediaSource:
    """Iterate for frames. Unreadable images among several are skipped (a warning each) and listed
    in ``skipped``; a single unreadable image, or a video that gives no frames, is a UserError."""

    items: list[str]
    img_size: int | tuple[int, int]
    stride: int
    auto: bool
    skipped: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Frame]:
        for item in self.items:
            if is_image(item) and not is_stream(item):
                damage = image_damage(item)
                img = None if damage else cv2.imread(item)
                if img is None:
                    if len(self.items) == 1:
                        raise UserError(f"--source {item}: {damage or 'unreadable image'}")
                    print(f"warning: {item}: {damage or 'unreadable image'}, skipped", file=sys.stderr)
                    self.skipped.append(item)
                    continue
                yield self._frame(item, 0, img)
            else:
                yield from self._video(item)

    def _frame(self, path: str, index: int, img: np.ndarray, **video) -> Frame:
        boxed, ratio, pad = letterbox(img, self.img_size, auto=self.auto, stride=self.stride)
        chw = np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1))
        return Frame(path, index, img, chw, ratio, pad, **video)

    def _video(self, name: str) -> Iterator[Frame]:
        cap = cv2.VideoCapture(int(name) if name.isdigit() else name)
        if not cap.isOpened():
            raise UserError(f"--source {name}: OpenCV cannot open this video, webcam or stream")
        fps = cap.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
        n = 0
        try:
            while True:
                ok, img = cap.read()
                if not ok:
                    break
                size = (img.shape[1], img.shape[0])
                yield self._frame(name, n, img, is_video=True, fps=fps, video_size=size)
                n += 1
        finally:
            cap.release()
        if n == 0:
            raise UserError(f"--source {name}: no frames could be read (unreadable or empty video)")


def open_source(source: str, img_size: int | tuple[int, int], stride: int, auto: bool) -> MediaSource:
    """Frames of ``source`` letterboxed to ``img_size`` (an int or (h, w)); with ``auto`` the padding
    is only what makes each side a multiple of ``stride`` (rectangular inference)."""
    return MediaSource(expand_source(str(source)), img_size, stride, auto)
