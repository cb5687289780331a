"""detect.py: run a detector on images, folders, globs, videos, webcams, streams or .txt lists.

    python detect.py --weights runs/train/exp/weights/best.pt              # the sample images in data/samples
    python detect.py --data my.data --weights best.pt --source images/  # class names from the .data file
    python detect.py --cfg cfg/yolov3-tiny.cfg --weights yolov3-tiny.weights --source video.mp4
    python detect.py --weights model.onnx --source 0 --view-img

Images are written annotated under the same file name, videos as annotated .mp4 with the source's
frame rate; ``--save-txt`` writes ``labels/<stem>.txt`` (videos ``<stem>_<frame>.txt``) with rows
``class xc yc w h conf`` normalised to the original image. Sources in subfolders (a recursive glob)
keep their subfolders, so equal names never collide. The output folder is created (default
runs/detect/exp, exp2, ...); an existing --output is added to, never emptied. Every destination is
checked before the first write: a source image, or the ground-truth label file of one, is never
written over, and an existing file only with --exist-ok.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path

import cv2
import numpy as np
import torch

from models.backends import Detector, load_detector
from utils.boxes import non_max_suppression, scale_boxes
from utils.cli import COUNT, COUNT0, FRACTION, IMG_SIZE, Parser, run_cli
from utils.datasets import read_data_file
from utils.errors import UserError
from utils.files import img2label_path, is_image, is_video, next_run_dir, read_names
from utils.outputs import OutputPlan, atomic_path, atomic_write, output_folder
from utils.plots import draw_detections
from utils.sources import Frame, is_stream, open_source, output_stem
from utils.torch_utils import select_device

SAMPLES = Path(__file__).resolve().parent / "data" / "samples"


@dataclass
class DetectSummary:
    output: Path
    img_size: int | tuple[int, int]  # what the frames were letterboxed to
    frames: int = 0
    detections: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable images passed over
    written: list[Path] = field(default_factory=list)  # annotated images and videos


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="detect.py", description=__doc__)
    p.add_argument("--weights", required=True, help=".pt, darknet weights with --cfg, or .onnx")
    p.add_argument("--cfg", default=None, help="darknet cfg (needed with darknet weights)")
    p.add_argument("--source", default=None,
                   help="image, folder, glob, video, webcam index, URL, .txt (default: the sample images in "
                        "the project's data/samples)")
    p.add_argument("--data", default=None, help=".data file whose names= file names the classes")
    p.add_argument("--img-size", type=IMG_SIZE, default=None,
                   help="default: the checkpoint's or ONNX's size, else the cfg's")
    p.add_argument("--conf-thres", type=FRACTION, default=0.25)
    p.add_argument("--iou-thres", type=FRACTION, default=0.45)
    p.add_argument("--max-det", type=COUNT, default=1000)
    p.add_argument("--classes", type=COUNT0, nargs="+", default=None, help="keep only these class indices")
    p.add_argument("--agnostic-nms", action="store_true")
    p.add_argument("--half", action="store_true", help="float16 (PyTorch on CUDA only)")
    p.add_argument("--device", default="cpu", help="cpu, 0, cuda:1")
    p.add_argument("--view-img", action="store_true", help="show frames (needs OpenCV with a GUI); q quits")
    p.add_argument("--names", default=None, help="class names file, one per line (overrides the model's)")
    p.add_argument("--save-txt", action="store_true", help="labels/<stem>.txt: class xc yc w h conf")
    p.add_argument("--save-conf", action="store_true",
                   help="accepted for ultralytics users: --save-txt rows always end with the confidence")
    p.add_argument("--nosave", action="store_true", help="do not write annotated images/videos")
    p.add_argument("--output", default=None, help="default runs/detect/<name> (created, never emptied)")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true",
                   help="replace files already in the output folder (and reuse runs/detect/<name>); "
                        "sources and their ground-truth labels are never written over")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def has_gui() -> bool:
    """Whether this OpenCV build can open windows (opencv-python-headless cannot)."""
    gui = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    return bool(gui) and "NONE" not in gui[0].upper()


def _check_args(a: argparse.Namespace, det: Detector, names: list[str] | None) -> None:
    if det.classes is not None:
        bad = [c for c in a.classes or [] if not 0 <= c < det.classes]
        if bad:
            raise UserError(f"--classes {bad[0]}: the model has classes 0..{det.classes - 1}")
        given = f"--names {a.names}" if a.names else f"--data {a.data}" if a.data else None
        if given and len(names) != det.classes:
            raise UserError(f"{given}: {len(names)} names but the model predicts {det.classes} classes")
    if det.fixed_hw and a.img_size and (a.img_size, a.img_size) != det.fixed_hw:
        raise UserError(f"--img-size {a.img_size}: {a.weights} was exported for {det.fixed_hw[0]}x"
                        f"{det.fixed_hw[1]} only (export with --dynamic for other sizes)")
    if a.img_size and a.img_size % det.stride:
        raise UserError(f"--img-size {a.img_size}: must be a multiple of {det.stride}")


def main(argv: list[str] | None = None) -> DetectSummary:
    a = parse_args(argv)
    if a.view_img and not has_gui():
        raise UserError("--view-img: this OpenCV build has no GUI (opencv-python-headless); drop --view-img")
    det = load_detector(a.weights, a.cfg, select_device(a.device), a.half)
    if a.names and a.data:
        raise UserError("--names and --data both name the classes: give one")
    names = read_names(a.names, "--names") if a.names else \
        read_data_file(a.data).names if a.data else det.names
    _check_args(a, det, names)
    img_size = det.fixed_hw or a.img_size or det.img_size
    source = open_source(a.source or str(SAMPLES), img_size, det.stride, auto=det.fixed_hw is None)
    if a.output and Path(a.output).exists() and not Path(a.output).is_dir():
        raise UserError(f"--output {a.output}: exists and is not a folder")
    out = Path(a.output) if a.output else next_run_dir(Path("runs") / "detect", a.name, a.exist_ok)
    dests = plan_outputs(source.items, out, a)
    summary = DetectSummary(out, img_size, skipped=source.skipped)
    import torchvision.ops  # noqa: F401 -- NMS imports it lazily; here it stays out of frame 1's time
    t_start, t_model = time.perf_counter(), 0.0
    # a source that fails to open (a stream, a video) leaves no empty output folder behind; each video is
    # renamed into place once it is complete
    with output_folder(out), contextlib.ExitStack() as videos:
        writers: dict[Path, cv2.VideoWriter] = {}
        for frame in source:
            t0 = time.perf_counter()
            dets = detect_frame(det, frame, a)
            t_model += time.perf_counter() - t0
            summary.frames += 1
            summary.detections += len(dets)
            dest = dests[frame.path]
            if a.save_txt:
                txt = dest.labels.with_name(f"{dest.labels.stem}_{frame.index}.txt") if frame.is_video \
                    else dest.labels
                write_txt(txt, dets, frame.image.shape[:2])
            if not a.nosave or a.view_img:
                annotated = draw_detections(frame.image.copy(), dets, names)
            if not a.nosave:
                _save(annotated, frame, dest.annotated, videos, writers, summary)
            print(f"{_where(frame)}: {_counts(dets, names)} ({1000 * (time.perf_counter() - t0):.1f} ms)")
            if a.view_img:
                cv2.imshow(frame.path, annotated)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
    ms = 1000 * t_model / max(summary.frames, 1)
    print(f"{summary.frames} frames at {img_size}, {summary.detections} detections, {len(summary.skipped)} "
          f"unreadable skipped; {ms:.1f} ms/frame (model + NMS), {time.perf_counter() - t_start:.1f} s in "
          f"all; results in {out}")
    return summary


def detect_frame(det: Detector, frame: Frame, a: argparse.Namespace) -> np.ndarray:
    """(n, 6) [x1, y1, x2, y2, conf, cls] in the original image's pixels, after NMS."""
    x = torch.from_numpy(frame.letterboxed)[None].float() / 255
    pred = non_max_suppression(det(x), a.conf_thres, a.iou_thres, a.classes, a.agnostic_nms, a.max_det,
                               multi_label=False)[0]
    pred[:, :4] = scale_boxes(pred[:, :4], frame.letterboxed.shape[1:], frame.image.shape[:2],
                              (frame.ratio, frame.pad))
    return pred.numpy()


@dataclass(frozen=True)
class Destination:
    annotated: Path  # the annotated image, or the .mp4 of a video or stream
    labels: Path  # --save-txt: labels/<name>.txt (a video's frames: <stem>_<frame>.txt beside it)


def plan_outputs(items: list[str], out: Path, a: argparse.Namespace) -> dict[str, Destination]:
    """Where each source's outputs go, every destination checked before anything is written.

    Names are the sources' paths relative to their common folder (a recursive glob keeps its
    subfolders). A source, or the ground-truth label file of a source image, is never written over;
    a file already in ``out`` only with --exist-ok; two sources may not share an output.
    """
    files = [Path(os.path.abspath(i)) for i in items if not is_stream(i)]
    root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else None
    inputs = [*files, *(img2label_path(f) for f in files if is_image(f))]
    plan = OutputPlan(inputs, a.exist_ok)
    dests, frame_labels = {}, []
    for item in items:
        if is_stream(item):
            rel = Path(output_stem(item) + ".mp4")
        else:
            rel = Path(os.path.abspath(item)).relative_to(root)
            if is_video(item):
                rel = rel.with_suffix(".mp4")
        d = Destination(out / rel, out / "labels" / rel.with_suffix(".txt"))
        if not a.nosave:
            plan.add(d.annotated, f"the annotated {item}")
        if a.save_txt and (is_stream(item) or is_video(item)):
            frame_labels.append(d.labels)
        elif a.save_txt:
            plan.add(d.labels, f"the labels of {item}")
        dests[item] = d
    plan.check()
    for labels in frame_labels:  # one file per frame: none of the names it could take may exist
        taken = [f for f in labels.parent.glob(f"{glob_escape(labels.stem)}_*.txt")
                 if f.stem[len(labels.stem) + 1:].isdigit()]
        if taken and not a.exist_ok:
            raise UserError(f"{taken[0]}: exists; pass --exist-ok to replace it, or choose another --output")
    return dests


def write_txt(path: Path, dets: np.ndarray, hw: tuple[int, int]) -> None:
    """Rows ``class xc yc w h conf`` normalised to the original image (an empty file for no boxes)."""
    h, w = hw
    rows = [f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
            f"{(y2 - y1) / h:.6f} {conf:.5f}\n" for x1, y1, x2, y2, conf, c in dets]
    atomic_write(path, "".join(rows))


def _save(img: np.ndarray, frame: Frame, path: Path, videos: contextlib.ExitStack,
          writers: dict[Path, cv2.VideoWriter], summary: DetectSummary) -> None:
    if not frame.is_video:
        ok, encoded = cv2.imencode(path.suffix, img)
        if not ok:
            raise UserError(f"{path}: OpenCV cannot encode a {path.suffix} image")
        atomic_write(path, encoded.tobytes())
        summary.written.append(path)
        return
    if path not in writers:
        tmp = videos.enter_context(atomic_path(path))
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), frame.fps, frame.video_size)
        if not writer.isOpened():
            raise UserError(f"{path}: OpenCV cannot write an mp4v video here")
        videos.callback(writer.release)  # released before the rename above it on the stack
        writers[path] = writer
        summary.written.append(path)
    writers[path].write(img)


def _where(frame: Frame) -> str:
    return f"{frame.path} frame {frame.index}" if frame.is_video else frame.path


def _counts(dets: np.ndarray, names: list[str] | None) -> str:
    """``2 circle, 1 square`` (class indices where there are no names), or ``nothing``."""
    parts = []
    for c in np.unique(dets[:, 5]).astype(int):
        name = names[c] if names and c < len(names) else str(c)
        parts.append(f"{int((dets[:, 5] == c).sum())} {name}")
    return ", ".join(parts) or "nothing"


if __name__ == "__main__":
    sys.exit(run_cli(main))
