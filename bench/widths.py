"""Which channel counts the CPU kernels like: one conv layer timed at every width in a range.

    .venv/bin/python -m bench.widths                         # 3x3 convs, c -> c channels, 28x28, c = 48..80
    .venv/bin/python -m bench.widths --size 56 --widths 24 48 --kernel 1
    .venv/bin/python -m bench.widths --widths 16 128 --step 16   # the cost per multiply-add of narrow convs

Each width ``c`` is a ``Conv(c, c, k) + bias + LeakyReLU(0.1)`` (a darknet conv with its batch norm
folded) on a ``1 x c x size x size`` input, timed in onnxruntime (the float ONNX, its session alone
with onnxruntime's default threading: :func:`models.summary.ort_latencies`) and then in PyTorch as the
suite runs it (channels-last, the activation in place: ``Darknet.deploy``), batch 1, median of
``--runs`` runs. The table gives milliseconds
and nanoseconds per multiply-add: a width the kernels like has a lower cost per multiply-add than its
neighbours. It decides the default ``--round-to`` of the channel-pruning methods (docs/pruning.md).
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from torch import nn

from models.summary import cpu_description, latencies, ort_latencies
from utils.cli import COUNT, Parser
from utils.files import new_run_dir
from utils.outputs import atomic_write


def conv_layer(c: int, k: int) -> nn.Module:
    torch.manual_seed(c)
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2), nn.LeakyReLU(0.1, inplace=True)).eval()


def time_width(c: int, k: int, size: int, runs: int) -> dict:
    m = conv_layer(c, k)
    x = torch.rand(1, c, size, size)
    buffer = io.BytesIO()  # into a temporary in memory: no file is written
    torch.onnx.export(m, (x,), buffer, input_names=["x"], opset_version=13, dynamo=False)
    (ort_ms,) = ort_latencies([buffer.getvalue()], x.numpy(), runs)
    m.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)  # as every conv after the first gets it, deployed
    with torch.no_grad():
        (pt_ms,) = latencies([lambda: m(x)], runs)
    macs = c * c * k * k * size * size
    return {"width": c, "macs": macs, "ort_ms": ort_ms, "pt_ms": pt_ms,
            "ort_ns_per_mac": ort_ms * 1e6 / macs, "pt_ns_per_mac": pt_ms * 1e6 / macs}


def markdown(rows: list[dict], k: int, size: int, runs: int) -> str:
    best_ort = min(r["ort_ns_per_mac"] for r in rows)
    best_pt = min(r["pt_ns_per_mac"] for r in rows)
    lines = [f"{k}x{k} conv c -> c at {size}x{size}, batch 1, median of {runs} runs; {cpu_description()}",
             "", "| width | mod 8 | onnxruntime ms | cost per multiply-add (× best) | PyTorch ms "
             "| cost per multiply-add (× best) |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['width'] % 8} | {r['ort_ms']:.3f} | "
                     f"{r['ort_ns_per_mac'] / best_ort:.2f} | {r['pt_ms']:.3f} | "
                     f"{r['pt_ns_per_mac'] / best_pt:.2f} |")
    lines.append("")
    for key, name in (("ort_ns_per_mac", "onnxruntime"), ("pt_ns_per_mac", "PyTorch")):
        for m in (4, 8, 16):
            on = [r[key] for r in rows if r["width"] % m == 0]
            off = [r[key] for r in rows if r["width"] % m]
            if on and off:
                ratio = np.median(on) / np.median(off)
                lines.append(f"- {name}: widths divisible by {m} cost {ratio:.2f}× the others per "
                             f"multiply-add (medians)")
    return "\n".join(lines) + "\n"


def build_parser() -> Parser:
    ap = Parser(prog="python -m bench.widths", description=__doc__)
    ap.add_argument("--widths", type=COUNT, nargs=2, default=[48, 80], metavar=("FIRST", "LAST"))
    ap.add_argument("--step", type=COUNT, default=1, help="time every STEP-th width from FIRST")
    ap.add_argument("--kernel", type=int, choices=(1, 3), default=3)
    ap.add_argument("--size", type=COUNT, default=28)
    ap.add_argument("--runs", type=COUNT, default=50)
    ap.add_argument("--project", default="runs/bench")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    lo, hi = sorted(a.widths)
    rows = [time_width(c, a.kernel, a.size, a.runs) for c in range(lo, hi + 1, a.step)]
    out = new_run_dir(a.project, "widths")
    table = markdown(rows, a.kernel, a.size, a.runs)
    atomic_write(out / "widths.json", json.dumps(rows, indent=2))
    atomic_write(out / "widths.md", table)
    print(table)
    print(f"results in {out}")
    return rows


if __name__ == "__main__":
    import sys

    from utils.cli import run_cli

    sys.exit(run_cli(main))
