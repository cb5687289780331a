"""Quantization benchmark: a trained float model against its PTQ and QAT versions.

Every QAT run fine-tunes the same float checkpoint with the same seed, epochs and fine-tuning
hyperparameters (``data/hyp.finetune.yaml``); only the quantization flags differ. A float run with
the same recipe separates what fine-tuning itself does from what quantization costs. PTQ calibrates
the float checkpoint on ``--calib-images`` training images. Every row is evaluated by ``test.py``.

    .venv/bin/python train.py --data shapes-hard --name float      # or any yolo-small trained on it
    .venv/bin/python -m bench.quant --weights runs/train/float/weights/last.pt --epochs 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import BENCH_DATA, evaluate_pt, finetune
from quant import ptq
from utils.cli import COUNT, EPOCH_OR_NEVER, EPOCHS, IMG_SIZE, POSITIVE, SEED, Parser
from utils.files import new_run_dir
from utils.outputs import atomic_write

QAT_RUNS = {  # name → (description, train options)
    "float": ("float fine-tuned, same recipe", {}),
    "google8": ("QAT 8/8 Google + BN fold", {"quantized": "google", "bn_fold": True}),
    "google8_ort": ("QAT 8/8 Google + BN fold, onnxruntime layout (--int8-target ort)",
                    {"quantized": "google", "bn_fold": True, "int8_target": "ort"}),
    "google8_pow2": ("QAT 8/8 Google + BN fold + power of two (--FPGA)",
                     {"quantized": "google", "bn_fold": True, "fpga": True}),
    "dorefa8": ("QAT 8/8 DoReFa", {"quantized": "dorefa"}),
    "google4_pow2": ("QAT 4/4 Google + BN fold + power of two (--FPGA)",
                     {"quantized": "google", "bn_fold": True, "fpga": True, "w_bit": 4, "a_bit": 4}),
    "google4": ("QAT 4/4 Google + BN fold", {"quantized": "google", "bn_fold": True, "w_bit": 4, "a_bit": 4}),
}
PTQ_RUNS = {  # name → (description, quant.ptq arguments)
    "ptq8": ("PTQ 8/8 (mse)", ["--calib", "mse"]),
    "ptq8_pow2": ("PTQ 8/8 (mse) --FPGA", ["--calib", "mse", "--FPGA"]),
    "ptq8_sym": ("PTQ 8/8 (mse) --a-symmetric (TensorRT)", ["--calib", "mse", "--a-symmetric"]),
    "ptq8_ort": ("PTQ 8/8 (mse) --int8-target ort (onnxruntime)", ["--calib", "mse", "--int8-target", "ort"]),
    "ptq4": ("PTQ 4/4 (mse)", ["--calib", "mse", "--w-bit", "4", "--a-bit", "4"]),
}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m bench.quant",
                description=__doc__)
    ap.add_argument("--weights", required=True, help="trained float .pt")
    ap.add_argument("--data", default=BENCH_DATA, help="default: %(default)s")
    ap.add_argument("--epochs", type=EPOCHS, default=4, help="QAT fine-tuning epochs")
    ap.add_argument("--freeze-bn-epoch", type=EPOCH_OR_NEVER, default=None, help="default: epochs // 2")
    ap.add_argument("--freeze-observer-epoch", type=EPOCH_OR_NEVER, default=None, help="default: epochs - 1")
    ap.add_argument("--dorefa-range", type=POSITIVE, default=None, help="default: train.py's")
    ap.add_argument("--hyp", default="data/hyp.finetune.yaml", help="QAT hyperparameters")
    ap.add_argument("--img-size", type=IMG_SIZE, default=224)
    ap.add_argument("--seed", type=SEED, default=0)
    ap.add_argument("--calib-images", type=COUNT, default=256)
    ap.add_argument("--runs", nargs="+", default=[*PTQ_RUNS, *QAT_RUNS], choices=[*PTQ_RUNS, *QAT_RUNS])
    ap.add_argument("--project", default="runs/bench")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    out = new_run_dir(a.project, "quant")
    freeze = {"freeze_bn_epoch": a.epochs // 2 if a.freeze_bn_epoch is None else a.freeze_bn_epoch,
              "freeze_observer_epoch": a.epochs - 1 if a.freeze_observer_epoch is None
              else a.freeze_observer_epoch}
    m50, m = evaluate_pt(a.weights, a.data, a.img_size, out, "float")
    rows = [{"run": "float (the input)", "map50": m50, "map": m, "seconds": None}]

    def record(name: str, description: str, weights: Path, seconds: float) -> None:
        m50, m = evaluate_pt(weights, a.data, a.img_size, out, f"test_{name}")
        rows.append({"run": description, "name": name, "map50": m50, "map": m, "seconds": seconds,
                     "weights": str(weights)})
        atomic_write(out / "quant.json", json.dumps({"options": vars(a), "rows": rows}, indent=2))

    for name in a.runs:
        t0 = time.time()
        if name in PTQ_RUNS:
            description, args = PTQ_RUNS[name]
            ptq.main(["--weights", a.weights, "--data", a.data, "--images", str(a.calib_images),
                      "--img-size", str(a.img_size), "--output", str(out / name), *args])
            record(name, description, out / name / "quantized.pt", time.time() - t0)
            continue
        description, opts = QAT_RUNS[name]
        if opts:
            opts = {**opts, **freeze}
            if a.dorefa_range is not None:
                opts["dorefa_range"] = a.dorefa_range
        finetune(Path(a.weights), a.data, a.epochs, out, name, img_size=[a.img_size], seed=a.seed, hyp=a.hyp,
                 **opts)
        record(name, description, out / name / "weights" / "last.pt", (time.time() - t0) / a.epochs)
    base = rows[0]
    print(f"\nQAT: {a.epochs} fine-tuning epochs ({a.hyp}), seed {a.seed}, {a.img_size} px, "
          f"BN frozen from epoch {freeze['freeze_bn_epoch']}, ranges from {freeze['freeze_observer_epoch']}; "
          f"PTQ: {a.calib_images} calibration images\n")
    print("| run | mAP@0.5 | mAP@0.5:0.95 | Δ mAP@0.5 vs float | s/epoch (QAT), s (PTQ) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        delta = f"{100 * (r['map50'] - base['map50']):+.1f} pt" if r["seconds"] is not None else ""
        sec = f"{r['seconds']:.0f}" if r["seconds"] is not None else ""
        print(f"| {r['run']} | {r['map50']:.3f} | {r['map']:.3f} | {delta} | {sec} |")
    print(f"\nresults in {out}")
    return rows


if __name__ == "__main__":
    main()
