"""Sparse training at equal epochs: the proximal step against the older sub-gradient, Adam against SGD.

    .venv/bin/python -m bench.sparsity --weights runs/compress/default/baseline/weights/last.pt \\
        --epochs 2 --runs proximal:adam:0.5 proximal:sgd:0.5 subgradient:adam:0.005 subgradient:sgd:0.005

Each run is ``train.py --weights W --hyp H -sr --sr-mode MODE --s S [--no-adam] --prune-method M
--sr-schedule SCHED --epochs E`` from the same checkpoint (the default recipe's sparse stage with
other settings). Then, for the penalized batch norms: the share of γ exactly zero, below 1e-3 and below
0.01; the sparse model's mAP; and the model with every channel at |γ| ≤ 1e-3 pruned (method M,
``--percent`` = that share) and its batch-norm statistics re-estimated on ``--recalibrate`` training
batches: its mAP and parameters. Writes ``sparsity.json`` and ``sparsity.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.common import BENCH_DATA, RECOVER_HYP, checked_hyp, finetune
from models.io import load_model
from prune import cli
from prune.methods import METHODS
from prune.sparsity import MODES, RANKS, SCHEDULES, sparse_convs
from utils.cli import COUNT, COUNT0, FRACTION, IMG_SIZE, Parser, run_cli
from utils.errors import UserError
from utils.files import new_run_dir
from utils.outputs import atomic_write

ZERO = 1e-3  # |γ| at or below this counts as emptied: its channel is pruned for the "pruned" columns


def parse_run(text: str) -> tuple[str, bool, float]:
    """``proximal:adam:0.5`` → (mode, adam, s)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in MODES or parts[1] not in ("adam", "sgd"):
        raise UserError(f"--runs {text!r}: expected MODE:OPTIMIZER:S with MODE in {'/'.join(MODES)} and "
                        f"OPTIMIZER adam or sgd, e.g. proximal:adam:0.5")
    try:
        s = float(parts[2])
    except ValueError:
        raise UserError(f"--runs {text!r}: S must be a number") from None
    return parts[0], parts[1] == "adam", s


def gamma_shares(weights: Path, method: str) -> dict[str, float]:
    model = load_model(weights)
    g = torch.cat([model.layers[i].bn.weight.detach().abs().flatten()
                   for i in sparse_convs(model, method)])
    return {"zero": float((g == 0).float().mean()), "below_1e-3": float((g <= ZERO).float().mean()),
            "below_0.01": float((g < 0.01).float().mean()), "median": float(g.median()),
            "channels": g.numel()}


def one_run(a, spec: str, out: Path) -> dict:
    mode, adam, s = parse_run(spec)
    name = f"{mode}-{'adam' if adam else 'sgd'}-s{s:g}"
    trained = finetune(Path(a.weights), a.data, a.epochs, out, name,
                       hyp=a.hyp, img_size=[a.img_size], sr=True, s=s,
                       sr_mode=mode, adam=adam, prune_method=a.method, sr_schedule=a.schedule,
                       sr_decay_at=a.decay_at, sr_keep=a.keep, sr_rank=a.rank)
    last = out / name / "weights" / "last.pt"
    shares = gamma_shares(last, a.method)
    percent = min(shares["below_1e-3"], 0.99)
    report = cli.main(a.method, ["--weights", str(last), "--data", a.data, "--img-size", str(a.img_size),
                                 "--percent", f"{percent:.4f}", "--recalibrate", str(a.recalibrate),
                                 "--output", str(out / name / "pruned")])
    before, after = report["before"], report["after"]
    return {"run": spec, "mode": mode, "optimizer": "adam" if adam else "sgd", "s": s, **shares,
            "map50_sparse": trained.map50, "map_sparse": trained.map, "map50_pruned": after["map50"],
            "map_pruned": after["map"], "params_before": before["params"], "params_after": after["params"]}


def markdown(rows: list[dict], a) -> str:
    lines = [f"Sparse stage: {a.epochs} epochs from `{a.weights}` with `{a.hyp}`, `--prune-method {a.method} "
             f"--sr-schedule {a.schedule} --sr-decay-at {a.decay_at:g} --sr-keep {a.keep:g} "
             f"--sr-rank {a.rank}`, {a.img_size} px; pruned: every channel at |γ| ≤ {ZERO:g}, BN "
             f"re-calibrated on {a.recalibrate} batches.", "",
             "| mode | optimizer | `--s` | γ exactly 0 | γ ≤ 1e-3 | γ < 0.01 | median \\|γ\\| "
             "| sparse mAP@0.5 / "
             "mAP@0.5:0.95 | pruned + recalibrated mAP@0.5 / mAP@0.5:0.95 | parameters after (ratio) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['optimizer']} | {r['s']:g} | {r['zero']:.1%} | "
                     f"{r['below_1e-3']:.1%} | {r['below_0.01']:.1%} | {r['median']:.3f} | "
                     f"{r['map50_sparse']:.3f} / {r['map_sparse']:.3f} | {r['map50_pruned']:.3f} / "
                     f"{r['map_pruned']:.3f} | {r['params_after'] / 1e6:.3f} M "
                     f"({r['params_after'] / r['params_before']:.2f}) |")
    return "\n".join(lines) + "\n"


def build_parser() -> Parser:
    ap = Parser(prog="python -m bench.sparsity", description=__doc__)
    ap.add_argument("--weights", required=True, help="the trained, not yet sparse checkpoint (.pt)")
    ap.add_argument("--data", default=BENCH_DATA, help="default: %(default)s")
    ap.add_argument("--runs", nargs="+", default=["proximal:adam:0.5", "proximal:sgd:0.5",
                                                  "subgradient:adam:0.005", "subgradient:sgd:0.005"])
    ap.add_argument("--epochs", type=COUNT, default=2)
    ap.add_argument("--hyp", default=RECOVER_HYP,
                    help="hyperparameters of every run (default: %(default)s, the default recipe's)")
    ap.add_argument("--method", default="slim", choices=list(METHODS))
    ap.add_argument("--schedule", default="global", choices=SCHEDULES)
    ap.add_argument("--decay-at", type=FRACTION, default=0.5, help="--sr-decay-at of every run")
    ap.add_argument("--keep", type=FRACTION, default=0.15, help="--sr-keep of every run (local schedule)")
    ap.add_argument("--rank", default="global", choices=RANKS, help="--sr-rank of every run (local schedule)")
    ap.add_argument("--img-size", type=IMG_SIZE, default=224)
    ap.add_argument("--recalibrate", type=COUNT0, default=20)
    ap.add_argument("--project", default="runs/bench")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    a.hyp = checked_hyp(a.hyp)
    for spec in a.runs:
        parse_run(spec)  # every spec is checked before the first run starts
    out = new_run_dir(a.project, "sparsity")
    rows = []
    for spec in a.runs:
        rows.append(one_run(a, spec, out))
        atomic_write(out / "sparsity.json", json.dumps(rows, indent=2))
    table = markdown(rows, a)
    atomic_write(out / "sparsity.md", table)
    print(table)
    print(f"results in {out}")
    return rows


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
