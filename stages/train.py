"""The training stage: ``train.py``'s options, the hooks they ask for, resuming, and the run.

Its options are groups, each declared beside what it configures: the engine's
(:class:`engine.options.TrainOptions`), sparse training's (:class:`prune.sparsity.SparsityOptions`),
quantization's (:class:`quant.hook.QuantOptions`) and distillation's
(:class:`distill.hook.DistillOptions`). A :class:`TrainJob` holds one of each; its hooks come from
the groups, and its ``record`` (every option, flat, as the flags name them) goes into ``opt.yaml`` and
every checkpoint, so ``--resume`` rebuilds the same job with all its groups.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.hook import DistillOptions
from engine.hooks import TrainHook
from engine.options import TrainOptions
from engine.trainer import Trainer, run_dir_of
from models.io import load_checkpoint
from prune.sparsity import SparsityOptions
from quant.hook import QuantOptions
from utils.cli import from_namespace, options_parser, to_argv, values_from_mapping
from utils.errors import UserError
from utils.results import StageResult

# (field of TrainJob, options class, parser group title)
GROUPS = (("core", TrainOptions, None),
          ("sparsity", SparsityOptions, "sparse training (BN-L1, see prune/sparsity.py)"),
          ("quant", QuantOptions, "quantization-aware training (see quant/ and the README)"),
          ("distill", DistillOptions, "knowledge distillation (see distill/hook.py and the README)"))


@dataclass
class TrainJob:
    core: TrainOptions = field(default_factory=TrainOptions)
    sparsity: SparsityOptions = field(default_factory=SparsityOptions)
    quant: QuantOptions = field(default_factory=QuantOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)

    def groups(self) -> list[Any]:
        return [getattr(self, name) for name, _, _ in GROUPS]

    def record(self) -> dict[str, Any]:
        """Every option, flat, by field name (what checkpoints keep and ``from_record`` reads back)."""
        return {k: v for g in self.groups() for k, v in dataclasses.asdict(g).items()}

    def argv(self) -> list[str]:
        """The ``train.py`` flags that reproduce this job."""
        return [a for g in self.groups() for a in to_argv(g)]

    def hooks(self, extra: Iterable[TrainHook] = ()) -> list[TrainHook]:
        """The techniques' hooks in the order they act: sparsity, ``extra``, quantization (it swaps the
        modules), distillation (it attaches to the swapped ones)."""
        made = [self.sparsity.hook(), *extra, self.quant.hook(), self.distill.hook()]
        return [h for h in made if h is not None]

    def check(self) -> TrainJob:
        """Refuse a technique's flag given while the technique is off (it would do nothing)."""
        for group in self.groups():
            group.check()
        return self

    def replace_core(self, **changes: Any) -> TrainJob:
        return dataclasses.replace(self, core=dataclasses.replace(self.core, **changes))

    @classmethod
    def from_record(cls, record: Mapping[str, Any], strict: bool = True) -> TrainJob:
        """From a flat record of field names. ``strict``: a name no group has is an error (not strict:
        left out, as for a checkpoint written by a newer version)."""
        known = {f.name for _, kind, _ in GROUPS for f in dataclasses.fields(kind)}
        unknown = sorted(set(record) - known)
        if strict and unknown:
            raise UserError(f"unknown train.py option {unknown[0]!r}; options: {', '.join(sorted(known))}")
        return cls(**{name: kind(**{f.name: record[f.name] for f in dataclasses.fields(kind)
                                    if f.name in record})
                      for name, kind, _ in GROUPS})

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], where: str) -> TrainJob:
        """From recipe keys (flag names, dashes or underscores), each value checked like the flag's."""
        values = values_from_mapping([kind for _, kind, _ in GROUPS], mapping, where, "train.py")
        return cls(**{name: kind(**values[kind]) for name, kind, _ in GROUPS}).check()


def build_parser(description: str = "") -> argparse.ArgumentParser:
    return options_parser("train.py", description, *((kind, title) for _, kind, title in GROUPS))


def parse(argv: list[str] | None = None, description: str = "") -> TrainJob:
    """``train.py``'s command line as a job; with ``--resume`` the job of that checkpoint."""
    ns = build_parser(description).parse_args(argv)
    job = TrainJob(**{name: from_namespace(kind, ns) for name, kind, _ in GROUPS}).check()
    if job.core.resume:
        return resumed(job.core.resume, job.core.project)
    return job


def latest(project: str) -> Path:
    found = sorted(Path(project).glob("*/weights/last.pt"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise UserError(f"--resume: no {project}/*/weights/last.pt to continue; name the checkpoint")
    return found[-1]


def resumed(path: str | Path, project: str = "runs/train") -> TrainJob:
    """The job a ``last.pt`` was saved by, continuing in the folder that holds the checkpoint (wherever
    the run was when it started: a moved or renamed run never writes into another one)."""
    p = latest(project) if str(path) == "latest" else Path(path)
    if not p.is_file():
        raise UserError(f"--resume {p}: checkpoint not found")
    meta = load_checkpoint(p)["meta"]
    if "opts" not in meta or "train_state" not in meta:
        raise UserError(f"--resume {p}: not a train.py last.pt (no optimizer state); start a new run "
                        f"with --weights {p} instead")
    record = dict(meta["opts"])
    if record.get("sr") and "sr_mode" not in record:  # saved before --sr-mode existed: the sub-gradient
        record["sr_mode"] = "subgradient"
    job = TrainJob.from_record(record, strict=False)
    run_dir = run_dir_of(p)
    job = job.replace_core(resume=str(p), exist_ok=True, project=str(run_dir.parent), name=run_dir.name)
    if meta["epoch"] + 1 >= job.core.epochs:
        raise UserError(f"--resume {p}: the run already finished its {job.core.epochs} epochs; start a new "
                        f"run with --weights {p} to train further")
    return job


def trainer(job: TrainJob, extra_hooks: Iterable[TrainHook] = ()) -> Trainer:
    return Trainer(job.core, job.hooks(extra_hooks), job.record())


def run(job: TrainJob, extra_hooks: Iterable[TrainHook] = ()) -> StageResult:
    t = trainer(job, extra_hooks)
    result = t.fit()
    last = t.weights_dir / "last.pt" if t.weights_dir is not None else None
    return StageResult(last, [], result)
