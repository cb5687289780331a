"""detect.py: run a detector on images, folders, globs, videos, webcams, streams or .txt lists.

    python detect.py --weights runs/train/exp/weights/best.pt --source data/images
    python detect.py --cfg cfg/yolov3-tiny.cfg --weights yolov3-tiny.weights --source video.mp4
    python detect.py --weights model.onnx --source 0 --view-img
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from models.backends import load_detector
from utils.augment import letterbox
from utils.boxes import non_max_suppression, scale_boxes
from utils.cli import run_cli
from utils.errors import UserError
from utils.files import new_run_dir
from utils.plots import draw_detections
from utils.sources import open_source
from utils.torch_utils import select_device


@dataclass
class DetectSummary:
    output: Path
    frames: int = 0
    detections: int = 0
    skipped: list[str] = field(default_factory=list)
    per_frame: list[np.ndarray] = field(default_factory=list)  # (n, 6) in original pixels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help=".pt, darknet weights with --cfg, or .onnx")
    p.add_argument("--cfg", default=None)
    p.add_argument("--source", required=True, help="image, folder, glob, video, webcam index, URL, .txt")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's, else 416")
    p.add_argument("--conf-thres", type=float, default=0.25)
    p.add_argument("--iou-thres", type=float, default=0.45)
    p.add_argument("--max-det", type=int, default=1000)
    p.add_argument("--classes", type=int, nargs="+", default=None, help="keep only these class indices")
    p.add_argument("--agnostic-nms", action="store_true")
    p.add_argument("--half", action="store_true", help="float16 (CUDA only)")
    p.add_argument("--device", default="")
    p.add_argument("--view-img", action="store_true")
    p.add_argument("--names", default=None, help="class names file (one per line)")
    p.add_argument("--save-txt", action="store_true", help="labels/<name>.txt: class xc yc w h conf")
    p.add_argument("--nosave", action="store_true", help="do not write annotated images/videos")
    p.add_argument("--output", default=None, help="default runs/detect/<name> (created, never emptied)")
    p.add_argument("--name", default="exp")
    return p.parse_args(argv)


def _has_gui() -> bool:
    info = cv2.getBuildInformation()
    gui = [ln for ln in info.splitlines() if ln.strip().startswith("GUI:")]
    return bool(gui) and "NONE" not in gui[0].upper()


def main(argv: list[str] | None = None) -> DetectSummary:
    a = parse_args(argv)
    if a.view_img and not _has_gui():
        raise UserError("--view-img: this OpenCV build has no GUI (opencv-python-headless); drop --view-img")
    device = select_device(a.device)
    det = load_detector(a.weights, a.cfg, device, a.half)
    names = det.names
    if a.names:
        names_file = Path(a.names)
        if not names_file.is_file():
            raise UserError(f"--names {names_file}: file not found")
        names = [s.strip() for s in names_file.read_text().splitlines() if s.strip()]
    img_size = a.img_size or det.img_size or 416
    if det.fixed_hw and a.img_size and (a.img_size, a.img_size) != det.fixed_hw:
        raise UserError(f"--img-size {a.img_size}: {a.weights} was exported for {det.fixed_hw[0]}x"
                        f"{det.fixed_hw[1]} only (export with --dynamic for other sizes)")
    if img_size % det.stride:
        raise UserError(f"--img-size {img_size}: must be a multiple of {det.stride}")
    out = Path(a.output) if a.output else new_run_dir("runs/detect", a.name)
    out.mkdir(parents=True, exist_ok=True)
    summary = DetectSummary(out)
    writers: dict[str, cv2.VideoWriter] = {}
    t_start = time.perf_counter()
    try:
        for frame in open_source(a.source, summary.skipped):
            t0 = time.perf_counter()
            shape = det.fixed_hw or img_size
            img, ratio, pad = letterbox(frame.image, shape, auto=det.fixed_hw is None, stride=det.stride)
            x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))[None].float() / 255
            pred = non_max_suppression(det(x), a.conf_thres, a.iou_thres, a.classes, a.agnostic_nms,
                                       a.max_det)[0].cpu()
            pred[:, :4] = scale_boxes(pred[:, :4], img.shape[:2], frame.image.shape[:2], (ratio, pad))
            d = pred.numpy()
            summary.frames += 1
            summary.detections += len(d)
            summary.per_frame.append(d)
            stem = Path(frame.path).stem if not frame.path.isdigit() else f"webcam{frame.path}"
            if a.save_txt:
                txt = f"{stem}_{frame.index}.txt" if frame.is_video else f"{stem}.txt"
                _write_txt(out / "labels" / txt, d, frame.image.shape[:2])
            annotated = draw_detections(frame.image.copy(), d, names)
            if not a.nosave:
                if frame.is_video:
                    _video_writer(writers, out / f"{stem}.mp4", frame).write(annotated)
                else:
                    cv2.imwrite(str(out / Path(frame.path).name), annotated)
            if a.view_img:
                cv2.imshow(frame.path, annotated)
                cv2.waitKey(1)
            counts = ", ".join(f"{int((d[:, 5] == c).sum())} {_name(names, c)}" for c in np.unique(d[:, 5]))
            where = f"{frame.path} frame {frame.index}" if frame.is_video else frame.path
            print(f"{where}: {counts or 'nothing'} ({1000 * (time.perf_counter() - t0):.1f} ms)")
    finally:
        for w in writers.values():
            w.release()
    print(f"{summary.frames} frames, {summary.detections} detections, {len(summary.skipped)} unreadable "
          f"skipped, {time.perf_counter() - t_start:.1f} s; results in {out}")
    return summary


def _name(names: list[str], c: float) -> str:
    return names[int(c)] if int(c) < len(names) else str(int(c))


def _write_txt(path: Path, dets: np.ndarray, hw: tuple[int, int]) -> None:
    """Rows ``class xc yc w h conf`` normalized to the original image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = hw
    rows = []
    for x1, y1, x2, y2, conf, c in dets:
        rows.append(f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                    f"{(y2 - y1) / h:.6f} {conf:.5f}\n")
    path.write_text("".join(rows))


def _video_writer(writers: dict, path: Path, frame) -> cv2.VideoWriter:
    if str(path) not in writers:
        h, w = frame.image.shape[:2]
        writers[str(path)] = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), frame.fps, (w, h))
    return writers[str(path)]


if __name__ == "__main__":
    sys.exit(run_cli(main))
