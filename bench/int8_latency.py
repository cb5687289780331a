"""onnxruntime CPU latency of the float ONNX against the INT8 (Q/DQ) ONNX of the same model, in one run.

The model has tame random weights (latency does not depend on their values), is quantized with
symmetric 8-bit activations and calibrated on random images (``quant.ptq.calibrate``), and both files
come from ``export.py``'s writers. onnxruntime's own quantizer (QOperator layout, uint8 activations)
is timed beside them as the reference for its integer kernels. All are timed alternately, batch 1,
so drift hits each; the ops onnxruntime actually ran after its graph optimisations are listed, which
says whether a graph ran integer kernels.

    .venv/bin/python -m bench.int8_latency                       # yolo-small and yolov3-tiny at 416
    .venv/bin/python -m bench.int8_latency --cfgs cfg/yolov4-tiny.cfg --img-size 320 --runs 50
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.common import latency_parser
from models.darknet import Darknet
from models.onnx import export_onnx, ort_session
from models.quantized.convert import QuantConfig, quantize_model
from models.quantized.modules import QuantSpec
from models.summary import latencies
from quant.ptq import calibrate
from quant.qdq import export_int8_onnx
from utils.torch_utils import tame_random_weights


def _ops(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _ort_quantize(src: Path, dst: Path, size: int) -> None:
    """onnxruntime's own static quantizer, in the layout its CPU kernels run fastest (QOperator:
    QLinearConv, QLinearLeakyRelu..., uint8 activations, int8 per-channel weights): the reference
    for what integer kernels reach here, not a model this project exports."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            images = [rng.random((1, 3, size, size), dtype=np.float32) for _ in range(4)]
            self.batches = iter([{"images": x} for x in images])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Images(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)


def bench_cfg(cfg: str, size: int, runs: int, warmup: int) -> dict:
    model = tame_random_weights(Darknet(cfg), seed=0, img_size=64).eval()
    qmodel = tame_random_weights(Darknet(cfg), seed=0, img_size=64)
    quantize_model(qmodel, QuantConfig(QuantSpec(a_symmetric=True)))
    g = torch.Generator().manual_seed(0)
    calibrate(qmodel, (torch.rand(2, 3, size, size, generator=g) for _ in range(4)))
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {"float": tmp / "float.onnx", "int8": tmp / "int8.onnx", "ort_qop": tmp / "ort_qop.onnx"}
        export_onnx(model.fuse(), files["float"], size)
        export_int8_onnx(qmodel, files["int8"], size)
        _ort_quantize(files["float"], files["ort_qop"], size)
        # optimized_path: what onnxruntime turned each graph into (the kernels it runs)
        sessions = {k: ort_session(f, optimized_path=f.with_suffix(".opt.onnx")) for k, f in files.items()}
        ops = {k: _ops(f.with_suffix(".opt.onnx")) for k, f in files.items()}
        calls = [lambda s=sess: s.run(None, {"images": x}) for sess in sessions.values()]
        med = dict(zip(sessions, latencies(calls, runs, warmup)))
    return {"cfg": cfg, "float_ms": med["float"], "int8_ms": med["int8"], "ratio": med["int8"] / med["float"],
            "ort_ms": med["ort_qop"], "ort_ratio": med["ort_qop"] / med["float"], "ops": ops}


def build_parser() -> argparse.ArgumentParser:
    return latency_parser("python -m bench.int8_latency", __doc__,
                          ["cfg/yolo-small.cfg", "cfg/yolov3-tiny.cfg"], runs=30, warmup=5)


def main(argv: list[str] | None = None) -> list[dict]:
    import onnxruntime as ort

    a = build_parser().parse_args(argv)
    rows = [bench_cfg(c, a.img_size, a.runs, a.warmup) for c in a.cfgs]
    print(f"\nonnxruntime {ort.__version__} CPU, batch 1, {a.img_size}x{a.img_size}, median of {a.runs} "
          f"alternating runs\n")
    print("| cfg | float ms | INT8 Q/DQ ms (ours) | ours / float | onnxruntime QOperator ms "
          "| QOperator / float |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {Path(r['cfg']).name} | {r['float_ms']:.1f} | {r['int8_ms']:.1f} | {r['ratio']:.2f} | "
              f"{r['ort_ms']:.1f} | {r['ort_ratio']:.2f} |")
    for r in rows:
        for k in ("int8", "ort_qop"):
            top = ", ".join(f"{op} {n}" for op, n in r["ops"][k].most_common(6))
            print(f"\n{Path(r['cfg']).name}, {k}: the ops onnxruntime ran: {top}")
    return rows


if __name__ == "__main__":
    main()
