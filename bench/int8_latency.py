"""onnxruntime CPU latency of the float ONNX against the INT8 (Q/DQ) ONNX files of the same model, in one run.

The model has tame random weights (latency does not depend on their values), is quantized in both
layouts and calibrated on random images (``quant.ptq.calibrate``): TensorRT's (symmetric activations)
and onnxruntime's (uint8 activations, a quantizer after every conv); those files come from
``export.py``'s writers. Beside them: onnxruntime's layout with int8 activations (S8S8, the
measurement behind the uint8 choice), and onnxruntime's own quantizer (uint8 activations) in its
QOperator layout (the reference for its integer kernels) and its QDQ layout. All are timed at
batch 1, each session alone with onnxruntime's default threading, in rounds so drift hits each
(:func:`models.summary.ort_latencies`); the ops onnxruntime actually ran after its graph
optimisations are listed, which says whether a graph ran integer kernels, and the file sizes are
given.

    .venv/bin/python -m bench.int8_latency                       # yolo-small and yolov3-tiny at 416
    .venv/bin/python -m bench.int8_latency --cfgs cfg/yolov4-tiny.cfg --img-size 320 --runs 50
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import latency_parser
from models.darknet import Darknet
from models.onnx import export_onnx
from models.quantized.convert import QuantConfig, quantize_model
from models.quantized.modules import QuantSpec
from models.summary import ort_latencies
from quant.ptq import calibrate
from quant.qdq import export_int8_onnx, float_kernels, kernel_summary, ort_kernels
from utils.torch_utils import tame_random_weights


def _ort_quantize(src: Path, dst: Path, size: int, fmt: str = "QOperator") -> None:
    """onnxruntime's own static quantizer (uint8 activations, int8 per-channel weights), in its
    QOperator layout (QLinearConv, QLinearLeakyRelu...: the reference for what integer kernels reach
    here) or its QDQ layout; not a model this project exports."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            images = [rng.random((1, 3, size, size), dtype=np.float32) for _ in range(4)]
            self.batches = iter([{"images": x} for x in images])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Images(), quant_format=getattr(QuantFormat, fmt),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def _quantized(cfg: str, size: int, target: str, symmetric: bool) -> Darknet:
    model = tame_random_weights(Darknet(cfg), seed=0, img_size=64)
    quantize_model(model, QuantConfig(QuantSpec(a_symmetric=symmetric), target=target))
    g = torch.Generator().manual_seed(0)
    calibrate(model, (torch.rand(2, 3, size, size, generator=g) for _ in range(4)))
    return model


FILES = {"float": "float ONNX", "trt": "INT8, TensorRT layout",
         "ort": "INT8, onnxruntime layout (ours, U8S8)",
         "ort_s8s8": "the same with int8 activations (S8S8, session.qdqisint8allowed)",
         "ort_qop": "onnxruntime's own QOperator", "ort_qdq": "onnxruntime's own QDQ"}
S8S8 = {"session.qdqisint8allowed": "1"}  # without it onnxruntime fuses no int8-activation conv on x86


def _export_s8s8(cfg: str, size: int, path: Path) -> None:
    """Our onnxruntime layout with symmetric int8 activations: not a format export.py writes (its
    check refuses it), only the measurement that chose uint8."""
    from models.onnx import export_onnx
    from quant.qdq import int8_initializers

    model = _quantized(cfg, size, "ort", symmetric=True)
    export_onnx(model, path, size, rewrite=int8_initializers(model), check=lambda *args: None)


def bench_cfg(cfg: str, size: int, runs: int, warmup: int) -> dict:
    model = tame_random_weights(Darknet(cfg), seed=0, img_size=64).eval()
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: Path(tmp) / f"{k}.onnx" for k in FILES}
        export_onnx(model.fuse(), files["float"], size)
        for target in ("trt", "ort"):
            export_int8_onnx(_quantized(cfg, size, target, target == "trt"), files[target], size)
        _export_s8s8(cfg, size, files["ort_s8s8"])
        _ort_quantize(files["float"], files["ort_qop"], size)
        _ort_quantize(files["float"], files["ort_qdq"], size, "QDQ")
        configs = {"ort_s8s8": S8S8}
        ops = {k: ort_kernels(f, configs.get(k)) for k, f in files.items()}
        mb = {k: f.stat().st_size / 1e6 for k, f in files.items()}
        med = dict(zip(files, ort_latencies(list(files.values()), x, runs, warmup,
                                            configs=[configs.get(k) for k in files])))
    return {"cfg": cfg, "ms": med, "mb": mb, "ops": ops}


def build_parser() -> argparse.ArgumentParser:
    return latency_parser("python -m bench.int8_latency", __doc__,
                          ["cfg/yolo-small.cfg", "cfg/yolov3-tiny.cfg"], runs=30, warmup=5)


def main(argv: list[str] | None = None) -> list[dict]:
    import onnxruntime as ort

    a = build_parser().parse_args(argv)
    rows = [bench_cfg(c, a.img_size, a.runs, a.warmup) for c in a.cfgs]
    print(f"\nonnxruntime {ort.__version__} CPU, batch 1, {a.img_size}x{a.img_size}, median of {a.runs} "
          f"runs, each session alone in 3 rounds; ratios to the float file's time and size\n")
    print("| cfg | file | ms | × float | MB | × float | float convs run |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ms, mb = r["ms"], r["mb"]
        for k, label in FILES.items():
            print(f"| {Path(r['cfg']).name} | {label} | {ms[k]:.1f} | {ms[k] / ms['float']:.2f} | "
                  f"{mb[k]:.2f} | {mb[k] / mb['float']:.2f} | {float_kernels(r['ops'][k])} |")
    for r in rows:
        for k in FILES:
            print(f"\n{Path(r['cfg']).name}, {k}: the ops onnxruntime ran: {kernel_summary(r['ops'][k], 6)}")
    return rows


if __name__ == "__main__":
    main()
