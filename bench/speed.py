"""Two checkpoints timed against each other: batch-1 CPU latency in onnxruntime and PyTorch at each size.

    .venv/bin/python -m bench.speed --before runs/compress/default/baseline/weights/last.pt \\
        --after runs/compress/default/finetune/weights/last.pt                  # 224 and 416 px
    .venv/bin/python -m bench.speed --before ... --after ... --torch-threads 1      # PyTorch on one thread
    .venv/bin/python -m bench.speed --before baseline.pt --after other-widths.cfg   # a cut before training it

The two models run in turn (``--runs`` each, median): onnxruntime on the exported float ONNX (BN folded
by onnxruntime), each session alone with onnxruntime's default threading, in 3 rounds; PyTorch on the
deployed model (``Darknet.deploy``: fused, channels-last), in alternation, on PyTorch's default threads
or ``--torch-threads N`` (onnxruntime keeps its own); as ``bench.prune_methods`` times its rows. The table
gives each ratio ``after / before`` and that ratio divided by the GFLOPs ratio (1.0 when time falls
exactly with compute). The ONNX files go to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.prune_methods import speeds
from models.darknet import Darknet
from models.io import load_model
from models.summary import summarize
from utils.cli import COUNT, IMG_SIZE, Parser, run_cli
from utils.torch_utils import tame_random_weights


def markdown(result: dict[int, dict], gflops: dict[int, tuple[float, float]], runs: int,
             torch_threads: int | None = None) -> str:
    threads = f", {torch_threads} thread{'s' if torch_threads > 1 else ''}" if torch_threads else ""
    lines = [f"Batch 1, CPU, median of {runs} runs (onnxruntime: each session alone, 3 rounds; PyTorch: "
             f"alternating{threads}); ratio = after / before, ÷ GFLOPs = that ratio divided by the GFLOPs "
             "ratio.", "",
             "| size | GFLOPs before / after (ratio) | onnxruntime ms before / after | ratio (÷ GFLOPs) "
             "| PyTorch ms before / after | ratio (÷ GFLOPs) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, r in result.items():
        g0, g1 = gflops[size]
        g = g1 / g0
        ort, pt = r["ort_ms_after"] / r["ort_ms_before"], r["torch_ms_after"] / r["torch_ms_before"]
        lines.append(f"| {size} | {g0:.3f} / {g1:.3f} ({g:.2f}) | {r['ort_ms_before']:.2f} / "
                     f"{r['ort_ms_after']:.2f} | {ort:.2f} ({ort / g:.2f}) | {r['torch_ms_before']:.2f} / "
                     f"{r['torch_ms_after']:.2f} | {pt:.2f} ({pt / g:.2f}) |")
    return "\n".join(lines) + "\n"


def load(path: str) -> Darknet:
    """A checkpoint, or a cfg alone with tame random weights: a model's latency does not depend on its
    weights (denormals are flushed), so a cut's speed can be timed before it is trained."""
    if Path(path).suffix == ".cfg":
        return tame_random_weights(load_model(cfg=path), seed=0)
    return load_model(path).eval()


def build_parser() -> Parser:
    ap = Parser(prog="python -m bench.speed", description=__doc__)
    ap.add_argument("--before", required=True,
                    help="the reference checkpoint (.pt), e.g. the baseline, or a .cfg (random weights)")
    ap.add_argument("--after", required=True,
                    help="the checkpoint compared with it, e.g. the pruned model, or a .cfg (random weights)")
    ap.add_argument("--sizes", type=IMG_SIZE, nargs="+", default=[224, 416])
    ap.add_argument("--runs", type=COUNT, default=50, help="timed runs of each model per size")
    ap.add_argument("--torch-threads", type=COUNT, default=None,
                    help="PyTorch's intra-op threads while timing (default: its own choice)")
    return ap


def main(argv: list[str] | None = None) -> dict[int, dict]:
    a = build_parser().parse_args(argv)
    before, after = load(a.before), load(a.after)
    threads = torch.get_num_threads()
    try:
        if a.torch_threads:
            torch.set_num_threads(a.torch_threads)
        with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
            result = speeds(before, after, a.sizes, a.runs, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    gflops = {s: (summarize(before, s).gflops, summarize(after, s).gflops) for s in a.sizes}
    print(markdown(result, gflops, a.runs, a.torch_threads))
    return result


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
