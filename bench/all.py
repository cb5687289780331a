"""Every benchmark in one command, one table: the checkpoints come from a compress.py run.

    .venv/bin/python -m bench.all                       # uses (or first makes) runs/compress/default
    .venv/bin/python -m bench.all --only quant distill --epochs 2
    .venv/bin/python -m bench.all --quick               # 1 fine-tuning epoch, 5 timed runs: a smoke run

The pipeline's stages give what the training benchmarks need: its ``sparse`` checkpoint is pruned by
every method (``bench.prune_methods``), its ``prune`` output is the distillation student and its
``baseline`` the teacher (``bench.distill``), and its ``baseline`` is the float model that PTQ and QAT
start from (``bench.quant``). The latency and speed benchmarks need no checkpoint. Each benchmark still
prints its own table; this writes all their rows as one long table (benchmark, case, measure, value)
to ``runs/bench/all*/all.md`` and ``all.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import BENCH_DATA
from utils.cli import COUNT, EPOCHS, Parser
from utils.errors import UserError
from utils.files import new_run_dir
from utils.outputs import atomic_write

BENCHES = ("latency_opencv", "train_speed", "int8_latency", "prune_methods", "distill", "quant")


def _stage_checkpoint(run: Path, stage: str) -> str:
    from pipeline.runner import RECORD, StageRecord

    record = run / stage / RECORD
    if not record.is_file():
        raise UserError(f"--pipeline {run}: no finished stage '{stage}' ({record} missing); run "
                        f"compress.py first or name another run")
    if not json.loads(record.read_text())["finished"]:
        raise UserError(f"--pipeline {run}: stage '{stage}' did not finish; rerun compress.py")
    return str(StageRecord.read(record.parent, skipped=True).checkpoint)


def _commands(a: argparse.Namespace, run: Path, img: str, data: str) -> dict[str, Callable[[], list[dict]]]:
    from bench import distill, int8_latency, latency_opencv, prune_methods, quant, train_speed

    ckpt = lambda stage: _stage_checkpoint(run, stage)  # noqa: E731 - looked up only when the bench runs
    timed = ["--runs", str(a.runs)]
    return {
        "latency_opencv": lambda: latency_opencv.main(timed),
        "train_speed": lambda: train_speed.main(["--repeats", "1" if a.quick else "3"]),
        "int8_latency": lambda: int8_latency.main(timed),
        "prune_methods": lambda: prune_methods.main(
            ["--weights", ckpt("sparse"), "--data", data, "--finetune-epochs", str(a.epochs), *timed,
             "--project", str(a.project)]),
        "distill": lambda: distill.main(
            ["--student", ckpt("prune"), "--teacher", ckpt("baseline"), "--data", data, "--epochs",
             str(a.epochs), "--img-size", img, "--project", str(a.project),
             *(["--seeds", "0"] if a.quick else [])]),
        "quant": lambda: quant.main(
            ["--weights", ckpt("baseline"), "--data", data, "--epochs", str(a.epochs), "--img-size", img,
             "--project", str(a.project)]),
    }


def long_rows(bench: str, rows: list[dict]) -> list[tuple[str, str, str, float]]:
    """(benchmark, case, measure, value): the case is a row's first text field, each number a measure."""
    out = []
    for row in rows:
        case = next((str(v) for v in row.values() if isinstance(v, str)), "")
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((bench, case, key, float(value)))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m bench.all",
                description=__doc__)
    ap.add_argument("--pipeline", default="runs/compress/default",
                    help="a compress.py run folder whose stages give the checkpoints (made if missing)")
    ap.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    ap.add_argument("--epochs", type=EPOCHS, default=4, help="fine-tuning epochs of every training benchmark")
    ap.add_argument("--runs", type=COUNT, default=30, help="timed runs of every latency measurement")
    ap.add_argument("--quick", action="store_true", help="--epochs 1 --runs 5: checks that everything runs")
    ap.add_argument("--project", default="runs/bench")
    return ap


def main(argv: list[str] | None = None) -> list[tuple[str, str, str, float]]:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.epochs, a.runs = 1, 5
    run = Path(a.pipeline)
    needs_pipeline = {"prune_methods", "distill", "quant"} & set(a.only)
    if needs_pipeline and not (run / "report" / "report.json").is_file():
        if run != Path("runs/compress/default"):
            raise UserError(f"--pipeline {run}: no finished compress.py run there (no report/report.json)")
        from pipeline.compress import CompressOptions
        from pipeline.compress import run as compress

        print(f"{run} has no finished pipeline: running compress.py (the default recipe) first")
        compress(CompressOptions())
    img, data = "224", BENCH_DATA
    if needs_pipeline:
        report = json.loads((run / "report" / "report.json").read_text())
        img, data = str(report["img_size"]), report["data_file"]
    out = new_run_dir(a.project, "all")
    commands = _commands(a, run, img, data)
    table, seconds = [], {}
    for bench in a.only:
        print(f"\n=== bench.{bench} ===")
        t0 = time.time()
        table += long_rows(bench, commands[bench]() or [])
        seconds[bench] = time.time() - t0
        _write(out, a, table, seconds)
    print((out / "all.md").read_text())
    return table


def _write(out: Path, a: argparse.Namespace, table: list, seconds: dict[str, float]) -> None:
    lines = [f"# All benchmarks ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"`python -m bench.all --only {' '.join(a.only)} --epochs {a.epochs} --runs {a.runs}`, "
             f"checkpoints from `{a.pipeline}`. Wall time: "
             + ", ".join(f"{b} {s / 60:.1f} min" for b, s in seconds.items()) + ".", "",
             "| benchmark | case | measure | value |", "| --- | --- | --- | ---: |"]
    lines += [f"| {b} | {c} | {m} | {v:.4g} |" for b, c, m, v in table]
    atomic_write(out / "all.md", "\n".join(lines) + "\n")
    summary = {"options": vars(a), "seconds": seconds, "rows": table}
    atomic_write(out / "all.json", json.dumps(summary, indent=2))


if __name__ == "__main__":
    from utils.cli import run_cli

    raise SystemExit(run_cli(main))
