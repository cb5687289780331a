"""Inference sources: an image, a folder, a glob, a video, a webcam index, a stream URL or a .txt list."""

from __future__ import annotations

import glob as globlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.errors import UserError
from utils.files import is_image, is_video

STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")


@dataclass
class Frame:
    path: str  # file, or the stream / webcam name
    index: int  # frame number within a video or stream; 0 for images
    image: np.ndarray  # original BGR
    is_video: bool
    fps: float = 0.0


def _expand(source: str) -> list[str]:
    """The media files or stream names a --source stands for, in order."""
    if source.isdigit() or source.lower().startswith(STREAM_PREFIXES):
        return [source]
    p = Path(source)
    if any(ch in source for ch in "*?["):
        files = sorted(f for f in globlib.glob(source, recursive=True) if is_image(f) or is_video(f))
        if not files:
            raise UserError(f"--source {source}: the pattern matches no images or videos")
        return files
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if is_image(f) or is_video(f))
        if not files:
            raise UserError(f"--source {source}: the folder has no images or videos")
        return files
    if not p.exists():
        raise UserError(f"--source {source}: not found")
    if p.suffix.lower() == ".txt":
        files = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                f = Path(line)
                files.append(str(f if f.is_absolute() else p.parent / f))
        if not files:
            raise UserError(f"--source {source}: the list is empty")
        return files
    if not (is_image(p) or is_video(p)):
        raise UserError(f"--source {source}: not an image or video file this tool knows by its suffix")
    return [source]


def _video_frames(name: str) -> Iterator[Frame]:
    cap = cv2.VideoCapture(int(name) if name.isdigit() else name)
    if not cap.isOpened():
        raise UserError(f"--source {name}: OpenCV cannot open this video, webcam or stream")
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    n = 0
    try:
        while True:
            ok, img = cap.read()
            if not ok:
                break
            yield Frame(name, n, img, True, fps)
            n += 1
    finally:
        cap.release()
    if n == 0:
        raise UserError(f"--source {name}: no frames could be read (unreadable or empty video)")


def open_source(source: str, skipped: list[str] | None = None) -> Iterator[Frame]:
    """Frames of every item of ``source``. Unreadable images among several are skipped and listed in
    ``skipped``; a single unreadable image or any unreadable video is an error."""
    items = _expand(source)
    for item in items:
        if is_image(item):
            img = cv2.imread(item)
            if img is None:
                if len(items) == 1:
                    raise UserError(f"--source {item}: unreadable image")
                print(f"warning: {item}: unreadable image, skipped", file=sys.stderr)
                if skipped is not None:
                    skipped.append(item)
                continue
            yield Frame(item, 0, img, False)
        else:
            yield from _video_frames(item)
