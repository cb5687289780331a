"""What several benchmarks do the same way."""

from __future__ import annotations

from pathlib import Path

from utils.cli import COUNT, COUNT0, IMG_SIZE, Parser
from utils.evaluate import EvalResult

# the benchmarks' data unless --data says otherwise: the built-in benchmark hard enough to show what
# each method costs (the easy `shapes` saturates: every method looks lossless on it)
BENCH_DATA = "shapes-hard"
# what the default recipe fine-tunes a cut model with (Adam at 5e-4, no warm-up)
RECOVER_HYP = "data/hyp.recover.yaml"


def checked_hyp(path: str) -> str:
    """``--hyp`` found as train.py finds it (the shipped files from any folder) and read once, so a bad
    file is one line before a benchmark has spent any time."""
    from engine.options import in_repo, load_hyp

    load_hyp(in_repo(path))
    return str(in_repo(path))


def evaluate_pt(weights: str | Path, data: str, img_size: int, out: Path, name: str) -> tuple[float, float]:
    """``test.py --weights W`` → (mAP@0.5, mAP@0.5:0.95); the run folder goes under ``out``."""
    from utils.evaluate import TestOptions, evaluate_weights

    r = evaluate_weights(TestOptions(weights=str(weights), data=data, img_size=img_size, project=str(out),
                                     name=name, workers=0))
    return r.map50, r.map


def finetune(weights: Path, data: str, epochs: int, out: Path, name: str, **flags) -> EvalResult:
    """``train.py --weights W --hyp data/hyp.finetune.yaml`` for ``epochs`` (Adam at 5e-5, no warm-up),
    evaluated once at the end; ``flags`` are further train.py options by field name (``hyp`` too,
    ``kd_str`` and the other techniques' fields)."""
    from engine.options import REPO
    from stages.train import TrainJob, run

    flags.setdefault("hyp", str(REPO / "data" / "hyp.finetune.yaml"))
    job = TrainJob.from_record({"weights": str(weights), "data": data, "epochs": epochs, "project": str(out),
                                "name": name, "exist_ok": True, "notest": True, **flags})
    return run(job).value


def latency_parser(prog: str, description: str, cfgs: list[str], runs: int, warmup: int) -> Parser:
    """The flags of the latency benchmarks: which cfgs, the size, the timed and the warm-up runs."""
    ap = Parser(prog=prog, description=description)
    ap.add_argument("--cfgs", nargs="+", default=cfgs)
    ap.add_argument("--img-size", type=IMG_SIZE, default=416)
    ap.add_argument("--runs", type=COUNT, default=runs)
    ap.add_argument("--warmup", type=COUNT0, default=warmup)
    return ap
