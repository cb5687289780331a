"""test.py: mAP@0.5, mAP@0.5:0.95, P, R, F1 per class, speed, PR curve and confusion matrix.

    python test.py --weights runs/train/exp/weights/best.pt            # built-in benchmark, val split
    python test.py --cfg cfg/yolov3-tiny.cfg --weights yolov3-tiny.weights --data my.data --save-json
    python test.py --weights runs/train/exp/weights/best.int8.onnx   # an export, in onnxruntime
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from models.io import load_checkpoint, load_model
from utils.cli import BATCH, COUNT, FRACTION, IMG_SIZE, WORKERS, Parser, run_cli
from utils.datasets import create_dataloader, read_data_file, resolve_data
from utils.errors import UserError
from utils.evaluate import EvalResult, evaluate, format_table
from utils.files import new_run_dir
from utils.torch_utils import select_device


class OnnxModel(nn.Module):
    """An ONNX file (onnxruntime, CPU) behind the module interface :func:`evaluate` runs."""

    def __init__(self, path: Path):
        super().__init__()
        from models.backends import load_detector

        self.detector = load_detector(path)
        if self.detector.classes is None:
            raise UserError(f"--weights {path}: its output width is dynamic, so its class count is unknown")
        self.classes, self.stride = self.detector.classes, self.detector.stride
        self.dynamic = self.detector.fixed_hw is None
        self._device = nn.Parameter(torch.zeros(0), requires_grad=False)  # evaluate() reads the device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.detector(x.float()), None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="test.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True,
                   help=".pt checkpoint, darknet weights with --cfg, or an exported .onnx (onnxruntime)")
    p.add_argument("--cfg", default=None, help="cfg for darknet .weights")
    p.add_argument("--data", default="", help=".data file (default: built-in shapes benchmark)")
    p.add_argument("--task", default="valid", choices=["valid", "train"], help="which split")
    p.add_argument("--batch-size", type=BATCH, default=16)
    p.add_argument("--img-size", type=IMG_SIZE, default=None, help="default: the checkpoint's, else 416")
    p.add_argument("--conf-thres", type=FRACTION, default=0.001)
    p.add_argument("--iou-thres", type=FRACTION, default=0.6, help="NMS IoU")
    p.add_argument("--max-det", type=COUNT, default=300, help="detections per image after NMS")
    p.add_argument("--save-json", action="store_true",
                   help="write COCO-format detections and ground truth, and score them with pycocotools")
    p.add_argument("--device", default="")
    p.add_argument("--half", action="store_true", help="float16 inference (CUDA only)")
    p.add_argument("--workers", type=WORKERS, default=2)
    p.add_argument("--name", default="exp")
    p.add_argument("--project", default="runs/test")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> EvalResult:
    a = parse_args(argv)
    device = select_device(a.device)
    weights = Path(a.weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    meta = load_checkpoint(weights)["meta"] if weights.suffix == ".pt" else {}
    if weights.suffix == ".onnx":
        model = OnnxModel(weights)
        classes, stride, rect = model.classes, model.stride, model.dynamic
        default_size = model.detector.img_size
    else:
        model = load_model(weights, a.cfg, device).eval()
        classes, stride, default_size, rect = model.yolo_heads[0].classes, model.max_stride, None, True
    data = read_data_file(resolve_data(a.data))
    names = data.names
    if classes != data.classes:
        raise UserError(f"{weights}: the model predicts {classes} classes, {data.path} has {data.classes}")
    img_size = a.img_size or meta.get("img_size") or default_size or 416
    if img_size % stride:
        raise UserError(f"--img-size {img_size}: must be a multiple of {stride}")
    if not rect and model.detector.fixed_hw != (img_size, img_size):
        raise UserError(f"--img-size {img_size}: {weights} was exported for {model.detector.fixed_hw} only; "
                        f"export it with --dynamic to test at other sizes")
    half = a.half and device.type == "cuda"
    if a.half and not half:
        print("warning: --half needs CUDA; evaluating in float32")
    loader, _ = create_dataloader(data.split(a.task), data.classes, img_size, a.batch_size,
                                  stride, rect=rect, workers=a.workers, need_boxes=True)
    out_dir = new_run_dir(a.project, a.name)
    result = evaluate(model, loader, names, a.conf_thres, a.iou_thres, max_det=a.max_det, half=half,
                      json_path=out_dir / "detections.json" if a.save_json else None)
    print(format_table(result, names))
    sp = result.speed_ms
    print(f"speed per image at {img_size}: {sp['pre']:.1f} ms pre, {sp['inference']:.1f} ms inference, "
          f"{sp['nms']:.1f} ms NMS ({device}, batch {a.batch_size})")
    if result.coco:
        print(f"pycocotools: mAP@0.5 {result.coco['map50']:.4f} mAP@0.5:0.95 {result.coco['map']:.4f}")
    from utils.plots import plot_confusion_matrix, plot_pr_curve

    plot_pr_curve(result.stats, out_dir / "pr_curve.png")
    plot_confusion_matrix(result.confusion, names, out_dir / "confusion_matrix.png")
    print(f"results in {out_dir}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
