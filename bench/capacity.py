"""How hard a benchmark is: models of different capacity trained by the same command, one run per row.

    .venv/bin/python -m bench.capacity                                  # shapes-hard, the default command
    .venv/bin/python -m bench.capacity --models yolo-small yolo-small-w0.25 --epochs 24
    .venv/bin/python -m bench.capacity --models yolo-small-w1.5 --seed 1             # a second seed

Each row is ``train.py --data D --cfg C --epochs E --img-size S`` (the default training command with
another cfg): mAP@0.5 and mAP@0.5:0.95 of the final epoch, the spread of per-class AP@0.5 (the weakest
and strongest classes) and the wall time. ``<cfg>-w<k>`` is ``cfg/<cfg>.cfg`` with every conv's width
times k (the convs that feed a head keep theirs). Writes ``capacity.json``, ``capacity.md`` and, per
class, ``per_class.md``; each run's folder keeps its ``results.png`` (the learning curve).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from bench.common import BENCH_DATA
from engine.options import REPO, TrainOptions
from models.cfg import ModelCfg, read_cfg, save_cfg
from models.kinds import kind_of
from stages.train import TrainJob, run
from utils.cli import EPOCHS, IMG_SIZE, SEED, Parser, run_cli
from utils.files import new_run_dir
from utils.outputs import atomic_write


def scaled_cfg(name: str) -> ModelCfg:
    """``yolo-small`` → cfg/yolo-small.cfg; ``yolo-small-w0.25`` → the same, every conv that does not feed
    a head at a quarter of its width (at least 8 channels)."""
    m = re.fullmatch(r"(.+?)(?:-w([0-9.]+))?", name)
    cfg = read_cfg(REPO / "cfg" / f"{m.group(1)}.cfg")
    if m.group(2):
        k = float(m.group(2))
        for i, block in enumerate(cfg.layers):
            feeds_head = i + 1 < len(cfg.layers) and kind_of(cfg.layers[i + 1]).head
            if block.type == "convolutional" and not feeds_head:
                block.set("filters", max(8, round(block["filters"] * k / 8) * 8))
    return cfg


def train_row(name: str, data: str, epochs: int, img_size: int, out: Path, seed: int = 0) -> dict:
    cfg_path = out / f"{name}.cfg"
    save_cfg(scaled_cfg(name), cfg_path)
    t0 = time.time()
    job = TrainJob.from_record({"cfg": str(cfg_path), "data": data, "epochs": epochs, "img_size": [img_size],
                                "seed": seed, "project": str(out), "name": name, "exist_ok": True})
    result = run(job).value
    stats = result.stats
    ap50 = stats.ap[:, 0]
    order = np.argsort(ap50)
    names = [stats.names[int(c)] for c in stats.classes]
    return {"model": name, "map50": result.map50, "map": result.map, "minutes": (time.time() - t0) / 60,
            "ap50_min": float(ap50.min()), "ap50_max": float(ap50.max()),
            "weakest": [[names[i], float(ap50[i])] for i in order[:4]],
            "strongest": [[names[i], float(ap50[i])] for i in order[::-1][:3]],
            "per_class": {names[i]: [float(ap50[i]), float(stats.ap[i].mean())] for i in range(len(names))},
            "curve": str(out / name / "results.png")}


def markdown(rows: list[dict], data: str, epochs: int, img_size: int, seed: int = 0) -> tuple[str, str]:
    models = " ".join(r["model"] for r in rows)
    head = (f"`python -m bench.capacity --data {data} --models {models} --epochs {epochs} "
            f"--img-size {img_size} --seed {seed}`\n\n"
            "| model | mAP@0.5 | mAP@0.5:0.95 | per-class AP@0.5 (min–max) | weakest classes (AP@0.5) "
            "| minutes |\n"
            "| --- | ---: | ---: | --- | --- | ---: |\n")
    def row(r: dict) -> str:
        weakest = ", ".join(f"{n} {v:.2f}" for n, v in r["weakest"])
        spread = f"{r['ap50_min']:.2f}–{r['ap50_max']:.2f}"
        cells = [r["model"], f"{r['map50']:.3f}", f"{r['map']:.3f}", spread, weakest, f"{r['minutes']:.1f}"]
        return "| " + " | ".join(cells) + " |"

    lines = [row(r) for r in rows]
    classes = list(rows[0]["per_class"])
    per_class = ("| class | " + " | ".join(f"{r['model']} AP@0.5" for r in rows) + " |\n| --- |"
                 + " ---: |" * len(rows) + "\n"
                 + "\n".join(f"| {c} | " + " | ".join(f"{r['per_class'][c][0]:.3f}" for r in rows) + " |"
                             for c in classes))
    return head + "\n".join(lines) + "\n", per_class + "\n"


def build_parser() -> Parser:
    ap = Parser(prog="python -m bench.capacity", description=__doc__)
    ap.add_argument("--data", default=BENCH_DATA, help="default: %(default)s")
    ap.add_argument("--models", nargs="+", default=["yolo-small", "yolo-small-w0.25", "yolov3-tiny"])
    ap.add_argument("--epochs", type=EPOCHS, default=TrainOptions().epochs,
                    help="default: train.py's, %(default)s")
    ap.add_argument("--img-size", type=IMG_SIZE, default=224)
    ap.add_argument("--seed", type=SEED, default=0, help="train.py's --seed for every row; default: 0")
    ap.add_argument("--project", default="runs/bench")
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    out = new_run_dir(a.project, "capacity")
    rows = []
    for name in a.models:
        rows.append(train_row(name, a.data, a.epochs, a.img_size, out, a.seed))
        table, per_class = markdown(rows, a.data, a.epochs, a.img_size, a.seed)
        atomic_write(out / "capacity.json", json.dumps(rows, indent=2))
        atomic_write(out / "capacity.md", table)
        atomic_write(out / "per_class.md", per_class)
        print(table)
    return rows


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
