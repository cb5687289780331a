"""Distillation benchmark: one pruned student fine-tuned without distillation and with each ``--KDstr``.

Every run starts from the same student checkpoint with the same epochs and fine-tuning
hyperparameters (``--hyp``, by default the default recipe's ``data/hyp.recover.yaml``), once per
``--seeds``; only the distillation strategy differs. The teacher and the student before fine-tuning
are evaluated too, and each strategy's row gives the share of the teacher - plain fine-tuning gap in
mAP@0.5:0.95 it closes.

    .venv/bin/python compress.py          # the default recipe: baseline (teacher) and sparse model
    .venv/bin/python -m bench.prune_methods --weights runs/compress/default/sparse/weights/last.pt \\
        --target 0.8 --methods slim --finetune-epochs 0       # the 80 % slim cut (the student)
    .venv/bin/python -m bench.distill --student runs/bench/prune_methods/slim/recalibrated/pruned.pt \\
        --teacher runs/compress/default/baseline/weights/last.pt --epochs 3 --seeds 0 1

``--strategies 0 6 6:kd-feat=0`` adds ablation rows: a strategy with some of its weights changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from bench.common import BENCH_DATA, RECOVER_HYP, checked_hyp, evaluate_pt, finetune
from distill.hook import STRATEGIES, DistillOptions
from utils.cli import EPOCHS, IMG_SIZE, SEED, Parser, run_cli
from utils.files import new_run_dir
from utils.outputs import atomic_write

KD_FIELDS = ("kd_t", "kd_feat_t", "kd_cls", "kd_obj", "kd_box", "kd_feat", "kd_margin", "kd_warmup")
# each weight is read as train.py reads its flag (the bounded kind DistillOptions declares)
KD_TYPES = {f.name: f.metadata["type"] for f in fields(DistillOptions) if f.name in KD_FIELDS}


def strategy_row(text: str) -> tuple[int, dict[str, float]]:
    """``--strategies`` item: ``N`` (0: plain fine-tuning), or ``N:kd-feat=0,kd-box=0.5`` for an
    ablation row, the named weights replacing the table's for that row only."""
    head, _, rest = text.partition(":")
    try:
        k = int(head)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a strategy number, e.g. 6 or 6:kd-feat=0") \
            from None
    if k not in (0, *STRATEGIES):
        raise argparse.ArgumentTypeError(f"{text!r}: strategy {k} does not exist (0 .. {max(STRATEGIES)})")
    changes = {}
    for item in filter(None, rest.split(",")):
        name, _, value = item.partition("=")
        field = name.strip().lstrip("-").replace("-", "_")
        if field not in KD_FIELDS:
            raise argparse.ArgumentTypeError(f"{text!r}: {name!r} is not one of "
                                             f"{', '.join(f.replace('_', '-') for f in KD_FIELDS)}")
        try:
            changes[field] = KD_TYPES[field](value)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {name}: {e}") from None
    if changes and not k:
        raise argparse.ArgumentTypeError(f"{text!r}: plain fine-tuning (0) has no distillation weights")
    return k, changes


def row_name(k: int, changes: dict[str, float]) -> str:
    if not k:
        return "no distillation"
    extra = ", ".join(f"{n.replace('_', '-')} {v:g}" for n, v in changes.items())
    return f"KDstr {k} ({' + '.join(STRATEGIES[k])})" + (f", {extra}" if extra else "")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m bench.distill",
                description=__doc__)
    ap.add_argument("--student", required=True, help="pruned .pt to fine-tune")
    ap.add_argument("--teacher", required=True, help="unpruned .pt")
    ap.add_argument("--data", default=BENCH_DATA, help="default: %(default)s")
    ap.add_argument("--epochs", type=EPOCHS, default=4)
    ap.add_argument("--img-size", type=IMG_SIZE, default=224)
    ap.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1],
                    help="every run is repeated with each seed; the table gives mean ± half the range")
    ap.add_argument("--hyp", default=RECOVER_HYP,
                    help="fine-tuning hyperparameters (default: %(default)s, the default recipe's)")
    ap.add_argument("--strategies", type=strategy_row, nargs="+",
                    default=[(k, {}) for k in (0, *STRATEGIES)],
                    metavar="N[:WEIGHT=VALUE,...]",
                    help="0 is plain fine-tuning; 6:kd-feat=0 is strategy 6 with that weight changed (an "
                         "ablation row)")
    ap.add_argument("--project", default="runs/bench")
    d = DistillOptions()
    for name in KD_FIELDS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=KD_TYPES[name], default=getattr(d, name),
                        help="as train.py's")
    return ap


def summarize(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (the spread the table prints as ±)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def gap_recovered(row: dict, plain: dict | None, teacher: dict) -> float | None:
    """Share of the teacher - plain fine-tuning gap in mAP@0.5:0.95 that a strategy closes (1.0: all)."""
    if plain is None or row is plain or teacher["map"] <= plain["map"]:
        return None
    return (row["map"] - plain["map"]) / (teacher["map"] - plain["map"])


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    a.hyp = checked_hyp(a.hyp)
    out = new_run_dir(a.project, "distill")
    rows = []
    for label, path in (("teacher", a.teacher), ("student before fine-tuning", a.student)):
        m50, m = evaluate_pt(path, a.data, a.img_size, out, label.split()[0])
        rows.append({"run": label, "map50": m50, "map": m, "seconds_per_epoch": None})
    for row, (k, changes) in enumerate(a.strategies):
        kd = {"kd_str": k, "t_weights": a.teacher, **{n: getattr(a, n) for n in KD_FIELDS}, **changes} \
            if k else {}
        runs, seconds = [], 0.0
        for seed in a.seeds:
            t0 = time.time()
            runs.append(finetune(Path(a.student), a.data, a.epochs, out, f"row{row}-kd{k}-seed{seed}",
                                 img_size=[a.img_size], seed=seed, hyp=a.hyp, **kd))
            seconds += time.time() - t0
        (m50, s50), (m, s) = summarize([r.map50 for r in runs]), summarize([r.map for r in runs])
        rows.append({"run": row_name(k, changes), "map50": m50, "map": m,
                     "map50_spread": s50, "map_spread": s,
                     "map50_seeds": [r.map50 for r in runs], "map_seeds": [r.map for r in runs],
                     "seconds_per_epoch": seconds / a.epochs / len(a.seeds)})
        atomic_write(out / "distill.json", json.dumps(rows, indent=2))
    plain = next((r for r in rows if r["run"] == "no distillation"), None)
    for r in rows[2:]:
        r["gap_recovered"] = gap_recovered(r, plain, rows[0])
    atomic_write(out / "distill.json", json.dumps(rows, indent=2))
    print_table(rows, a)
    print(f"\nresults in {out}")
    return rows


def print_table(rows: list[dict], a: argparse.Namespace) -> None:
    weights = ", ".join(f"{n} {getattr(a, n):g}" for n in KD_FIELDS)
    seeds = " ".join(str(s) for s in a.seeds)
    print(f"\n{a.epochs} fine-tuning epochs with {a.hyp}, seeds {seeds}, {a.img_size} px; {weights}\n")
    print("| run | mAP@0.5 | mAP@0.5:0.95 | gap to the teacher recovered (mAP@0.5:0.95) | s/epoch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "map_spread" in r:
            m50, m = f"{r['map50']:.3f} ± {r['map50_spread']:.3f}", f"{r['map']:.3f} ± {r['map_spread']:.3f}"
        else:
            m50, m = f"{r['map50']:.3f}", f"{r['map']:.3f}"
        gap = f"{100 * r['gap_recovered']:+.0f} %" if r.get("gap_recovered") is not None else ""
        sec = f"{r['seconds_per_epoch']:.0f}" if r["seconds_per_epoch"] else ""
        print(f"| {r['run']} | {m50} | {m} | {gap} | {sec} |")


if __name__ == "__main__":
    sys.exit(run_cli(main))
