"""Distillation benchmark: one pruned student fine-tuned without distillation and with each ``--KDstr``.

Every run starts from the same student checkpoint with the same seed, epochs and fine-tuning
hyperparameters (``data/hyp.finetune.yaml``); only the distillation strategy differs. The teacher
and the student before fine-tuning are evaluated too, so the table shows what there was to recover.

    .venv/bin/python train.py --data shapes-hard -sr --sr-mode subgradient --s 0.005 --prune 1 \\
        --sr-schedule global --epochs 24 --name sparse
    .venv/bin/python train.py --data shapes-hard --weights runs/train/sparse/weights/last.pt \\
        --hyp data/hyp.finetune.yaml --epochs 4 --name teacher        # the unpruned model, penalty off
    .venv/bin/python prune/normal_prune.py --weights runs/train/sparse/weights/last.pt --percent 0.52 \\
        --data shapes-hard --recalibrate 20 --output runs/kd/student
    .venv/bin/python -m bench.distill --student runs/kd/student/pruned.pt \\
        --teacher runs/train/teacher/weights/last.pt --epochs 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import BENCH_DATA, evaluate_pt, finetune
from distill.hook import STRATEGIES, DistillOptions
from utils.cli import EPOCHS, IMG_SIZE, NONNEGATIVE, POSITIVE, SEED, Parser
from utils.files import new_run_dir
from utils.outputs import atomic_write

KD_FIELDS = ("kd_t", "kd_feat_t", "kd_cls", "kd_obj", "kd_box", "kd_feat", "kd_margin")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m bench.distill",
                description=__doc__)
    ap.add_argument("--student", required=True, help="pruned .pt to fine-tune")
    ap.add_argument("--teacher", required=True, help="unpruned .pt")
    ap.add_argument("--data", default=BENCH_DATA, help="default: %(default)s")
    ap.add_argument("--epochs", type=EPOCHS, default=4)
    ap.add_argument("--img-size", type=IMG_SIZE, default=224)
    ap.add_argument("--seed", type=SEED, default=0)
    ap.add_argument("--strategies", type=int, nargs="+", default=[0, *STRATEGIES], choices=[0, *STRATEGIES],
                    help="0 is plain fine-tuning")
    ap.add_argument("--project", default="runs/bench")
    d = DistillOptions()
    for name in KD_FIELDS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=POSITIVE if name.endswith("_t") else NONNEGATIVE,
                        default=getattr(d, name), help="as train.py's")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    out = new_run_dir(a.project, "distill")
    rows = []
    for label, path in (("teacher", a.teacher), ("student before fine-tuning", a.student)):
        m50, m = evaluate_pt(path, a.data, a.img_size, out, label.split()[0])
        rows.append({"run": label, "map50": m50, "map": m, "seconds_per_epoch": None})
    for k in a.strategies:
        kd = {"kd_str": k, "t_weights": a.teacher, **{n: getattr(a, n) for n in KD_FIELDS}} if k else {}
        t0 = time.time()
        r = finetune(Path(a.student), a.data, a.epochs, out, f"kd{k}", img_size=[a.img_size], seed=a.seed,
                     **kd)
        name = f"KDstr {k} ({' + '.join(STRATEGIES[k])})" if k else "no distillation"
        rows.append({"run": name, "map50": r.map50, "map": r.map,
                     "seconds_per_epoch": (time.time() - t0) / a.epochs})
        atomic_write(out / "distill.json", json.dumps(rows, indent=2))
    base = next((r for r in rows if r["run"] == "no distillation"), None)
    weights = ", ".join(f"{n} {getattr(a, n):g}" for n in KD_FIELDS)
    print(f"\n{a.epochs} fine-tuning epochs, seed {a.seed}, {a.img_size} px; {weights}\n")
    print("| run | mAP@0.5 | mAP@0.5:0.95 | Δ mAP@0.5:0.95 vs no distillation | s/epoch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        delta = f"{100 * (r['map'] - base['map']):+.1f} pt" if base and r["seconds_per_epoch"] else ""
        sec = f"{r['seconds_per_epoch']:.0f}" if r["seconds_per_epoch"] else ""
        print(f"| {r['run']} | {r['map50']:.3f} | {r['map']:.3f} | {delta} | {sec} |")
    print(f"\nresults in {out}")
    return rows


if __name__ == "__main__":
    main()
