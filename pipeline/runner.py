"""Run a recipe's stages in order, each in its own folder, skipping the ones already done.

Every stage folder holds ``stage.json``: written when the stage starts (it marks the folder as the
pipeline's) and completed when it ends, with the script's command line, the outputs and the wall time.
A finished stage whose recipe entry is unchanged is skipped; a changed one is an error that names
``--restart-from``. An interrupted training stage continues from its ``last.pt``.

Under ``torchrun`` every process runs the training stages (DistributedDataParallel, as train.py does);
only rank 0 runs the other stages and writes records and logs, and all ranks meet at a barrier after
each stage, so the next one starts from the files rank 0 finished.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import distributed
from pipeline.recipe import STAGE_REFERENCES, Recipe, Stage
from stages.registry import Managed
from utils.errors import UserError
from utils.outputs import atomic_write

RECORD = "stage.json"
FINISHED = object()  # a training stage found complete: nothing to run


@dataclass
class StageRecord:
    """What a stage left behind: read from its ``stage.json``."""

    name: str
    run: str
    folder: Path
    checkpoint: Path | None  # the .pt the next stage starts from (None: an export stage)
    outputs: list[Path] = field(default_factory=list)
    command: str = ""
    seconds: float = 0.0
    source: str | None = None  # the stage it started from
    options: dict[str, Any] = field(default_factory=dict)
    given: bool = False  # --weights stood in for this stage
    skipped: bool = False  # done by an earlier invocation

    @classmethod
    def read(cls, folder: Path, skipped: bool) -> StageRecord:
        r = json.loads((folder / RECORD).read_text())
        ckpt = r.get("checkpoint")
        return cls(r["name"], r["run"], folder, Path(ckpt) if ckpt else None, [Path(p) for p in r["outputs"]],
                   r["command"], r["seconds"], r["signature"].get("from"), r["signature"].get("options", {}),
                   r.get("given", False), skipped)


class _Tee:
    """stdout to the terminal and to a stage's log.txt."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.log.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _write_json(path: Path, value: dict) -> None:
    """Through a temporary file and a rename: other processes never read half a record."""
    atomic_write(path, json.dumps(value, indent=2))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


class Pipeline:
    def __init__(self, recipe: Recipe, root: Path, weights: str | None = None):
        # absolute, so the records stay valid from any working directory
        self.recipe, self.root = recipe, Path(root).resolve()
        self.weights = Path(weights) if weights else None
        if self.weights and not self.weights.is_file():
            raise UserError(f"--weights {self.weights}: file not found")
        if self.weights and self.weights.suffix != ".pt":
            raise UserError(f"--weights {self.weights}: the pipeline starts from a .pt checkpoint; train "
                            f"darknet weights on your data first (train.py --cfg C --weights W --data D) "
                            f"and give its last.pt")
        self.records: dict[str, StageRecord] = {}
        self.main = distributed.is_main()

    def folder(self, stage: Stage) -> Path:
        return self.root / stage.name

    def signature(self, stage: Stage, first: bool) -> dict[str, Any]:
        sig = stage.signature()
        if first and self.weights:
            sig = {"given": str(self.weights.resolve())}
        else:
            sig["run_wide"] = {"data": self.recipe.data, "img_size": self.recipe.img_size,
                               "cfg": self.recipe.cfg if first else "", "device": self.recipe.device}
        return _jsonable(sig)

    # ---------------------------------------------------------------- restarting
    def clear_from(self, name: str) -> None:
        """Delete the folders of stage ``name`` and every later one (only folders the pipeline made)."""
        self._start_processes()
        if not self.main:
            return self._barrier()
        start = self.recipe.index(name)
        doomed = [self.folder(s) for s in self.recipe.stages[start:] if self.folder(s).exists()]
        for folder in doomed:
            if not (folder / RECORD).is_file():
                raise UserError(f"--restart-from {name}: {folder} was not made by compress.py (no {RECORD}); "
                                f"move it away first")
        for folder in doomed:
            shutil.rmtree(folder)
            print(f"removed {folder} (--restart-from {name})")
        self._barrier()

    def _start_processes(self) -> None:
        """Under torchrun: the process group the barriers and the training stages use."""
        distributed.start(self.recipe.device)

    def _barrier(self) -> None:
        distributed.barrier()

    def close(self) -> None:
        """End the process group the pipeline started (torchrun)."""
        distributed.stop()

    # ---------------------------------------------------------------- running
    def run(self) -> list[StageRecord]:
        self._start_processes()
        self.root.mkdir(parents=True, exist_ok=True)
        stages = self.recipe.stages
        for k, stage in enumerate(stages):
            if self.main:
                print(f"\n=== stage {k + 1}/{len(stages)}: {stage.name} ({stage.run}"
                      f"{' ' + stage.method if stage.method else ''}) ===")
            record = self._stage(stage, first=k == 0)
            self._barrier()
            self.records[stage.name] = record or StageRecord.read(self.folder(stage), skipped=False)
        return list(self.records.values())

    def _stage(self, stage: Stage, first: bool) -> StageRecord | None:
        """Run (or skip) one stage; None on a rank other than 0, which reads rank 0's record after."""
        folder = self.folder(stage)
        record_path = folder / RECORD
        signature = self.signature(stage, first)
        if record_path.is_file():
            old = json.loads(record_path.read_text())
            if old["signature"] != signature:
                raise UserError(f"stage '{stage.name}': {folder} was made with other settings "
                                f"({json.dumps(old['signature'])}); the recipe now says "
                                f"{json.dumps(signature)}; rerun with --restart-from {stage.name}, or "
                                f"use another --name")
            if old["finished"]:
                record = StageRecord.read(folder, skipped=True)
                missing = [p for p in [record.checkpoint, *record.outputs] if p and not p.exists()]
                if missing:
                    raise UserError(f"stage '{stage.name}': {missing[0]} is missing; rerun with "
                                    f"--restart-from {stage.name}")
                if self.main:
                    print(f"skipped: done earlier ({record.seconds:.0f} s); its outputs are in {folder}")
                return record
        elif folder.exists() and self.main:
            raise UserError(f"stage '{stage.name}': {folder} exists and was not made by compress.py; "
                            f"move it away or use another --name")
        if first and self.weights:
            if not self.main:
                return None
            folder.mkdir(parents=True, exist_ok=True)
            return self._finish(stage, folder, signature, self.weights.resolve(), [], "given", 0.0,
                                given=True)
        kind = stage.kind
        checkpoint = folder / kind.checkpoint if kind.checkpoint else None
        options = self._resume(stage, checkpoint) or self.options(stage, first)
        if not self.main:  # only the training stages run on every process
            if kind.trains and options is not FINISHED:
                kind.run(options)
            return None
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(record_path, {"name": stage.name, "signature": signature, "finished": False})
        argv = ["--resume", str(checkpoint)] if options is FINISHED else kind.argv(options)
        command = f"{kind.command(stage.method)} {' '.join(argv)}"
        print(command)
        t0 = time.time()
        outputs: list[Path] = []
        with (folder / "log.txt").open("a") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
            if options is not FINISHED:  # a training stage whose last.pt had finished every epoch: done
                outputs = kind.run(options).outputs
        seconds = time.time() - t0  # of this invocation (a resumed stage: the part after the restart)
        return self._finish(stage, folder, signature, checkpoint, outputs, command, seconds)

    def _finish(self, stage: Stage, folder: Path, signature: dict, checkpoint: Path | None,
                outputs: list[Path], command: str, seconds: float, given: bool = False) -> StageRecord:
        _write_json(folder / RECORD, {
            "name": stage.name, "run": stage.run, "signature": signature, "finished": True,
            "checkpoint": str(checkpoint) if checkpoint else None, "outputs": [str(p) for p in outputs],
            "command": command, "seconds": round(seconds, 1), "given": given})
        return StageRecord.read(folder, skipped=False)

    def _resume(self, stage: Stage, checkpoint: Path | None) -> Any:
        """An interrupted training stage continues from its last.pt: its resumed options, FINISHED when
        it had nothing left to do, None for any other stage (it starts over)."""
        if not stage.kind.trains or checkpoint is None or not checkpoint.is_file():
            return None
        from models.io import load_checkpoint
        from stages.train import resumed

        meta = load_checkpoint(checkpoint)["meta"]
        if "opts" not in meta or "epoch" not in meta:
            return None
        if meta["epoch"] + 1 >= meta["opts"]["epochs"]:
            if self.main:
                print(f"{checkpoint} finished its {meta['opts']['epochs']} epochs before the interruption")
            return FINISHED
        if self.main:
            print(f"continuing the interrupted stage from {checkpoint} (epoch {meta['epoch'] + 1} done)")
        return resumed(checkpoint)

    def input_checkpoint(self, name: str) -> Path:
        record = self.records.get(name)
        if record is None or record.checkpoint is None:
            raise UserError(f"{self.recipe.path}: stage '{name}' has no checkpoint to start from")
        return record.checkpoint

    def options(self, stage: Stage, first: bool) -> Any:
        """The stage's typed options: the recipe's keys (a stage named as a teacher becomes its
        checkpoint), then the fields the pipeline manages."""
        recipe = self.recipe
        from utils.datasets import resolve_data

        mapping = {k: (str(self.input_checkpoint(v)) if k in STAGE_REFERENCES and v in self.records else v)
                   for k, v in stage.options.items()}
        options = stage.kind.from_mapping(stage.method, mapping, f"{recipe.path}: stage '{stage.name}'")
        weights = self.input_checkpoint(stage.source) if stage.source else None
        data = str(resolve_data(recipe.data)) if stage.run != "export" else ""
        managed = Managed(self.folder(stage), weights, recipe.cfg, data, recipe.img_size, recipe.device,
                          stage.source)
        return stage.kind.manage(options, managed)
