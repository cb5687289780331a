"""The stage kinds a recipe can run, each behind the same small interface.

A :class:`StageKind` turns a recipe stage's keys into its typed options (``from_mapping``, every key
checked as its flag is), sets the fields the pipeline manages (``manage``: input checkpoint, image
size, data, output folder...), runs them (``run(options) -> StageResult``) and says how a user would
run the same thing by hand (``command`` + ``argv``). The pipeline knows nothing else about a kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import export
from prune import cli as prune_cli
from quant import ptq
from stages import train
from utils.cli import to_argv
from utils.results import StageResult

# fields a recipe may not set: the pipeline sets them for every stage
MANAGED = {"weights", "project", "name", "exist_ok", "output", "resume", "data", "img_size", "device", "cfg"}


@dataclass(frozen=True)
class Managed:
    """What the pipeline decides for a stage: its folder, its input checkpoint (None: the first stage,
    which trains from ``cfg``), the run-wide data, image size and training device, and the name of the
    stage it starts from."""
    folder: Path
    weights: Path | None
    cfg: str
    data: str
    img_size: int
    device: str
    source: str | None


@dataclass(frozen=True)
class StageKind:
    name: str
    from_mapping: Callable[[str, Mapping[str, Any], str], Any]  # (method, recipe keys, where) -> options
    manage: Callable[[Any, Managed], Any]
    run: Callable[[Any], StageResult]
    command: Callable[[str], str]  # method -> how a user runs the script by hand
    argv: Callable[[Any], list[str]] = to_argv  # the flags that reproduce the options
    trains: bool = False  # runs on every torchrun process (DDP)
    checkpoint: str | None = None  # where its checkpoint lands in the stage folder (None: no checkpoint)


def _manage_train(job: train.TrainJob, m: Managed) -> train.TrainJob:
    core = {"img_size": [m.img_size], "data": m.data, "project": str(m.folder.parent),
            "name": m.folder.name, "exist_ok": True}
    if m.weights is not None:
        core["weights"] = str(m.weights)
    elif m.cfg:
        core["cfg"] = m.cfg
    if m.device:
        core["device"] = m.device
    return job.replace_core(**core)


def _manage_step(o: Any, m: Managed) -> Any:
    """Prune and PTQ: the input checkpoint, the size, the data and the stage folder as the output."""
    return dataclasses.replace(o, weights=str(m.weights), img_size=m.img_size, data=m.data,
                               output=str(m.folder), exist_ok=True)


def _manage_export(o: export.ExportOptions, m: Managed) -> export.ExportOptions:
    return dataclasses.replace(o, weights=str(m.weights), img_size=[m.img_size],
                               output=str(m.folder / m.source), exist_ok=True)


KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("train", lambda method, mapping, where: train.TrainJob.from_mapping(mapping, where),
              _manage_train, train.run, lambda m: "python train.py", argv=lambda job: job.argv(), trains=True,
              checkpoint="weights/last.pt"),
    StageKind("prune", prune_cli.from_mapping, _manage_step, prune_cli.run,
              lambda m: f"python prune/{m}_prune.py", checkpoint="pruned.pt"),
    StageKind("ptq", lambda method, mapping, where: ptq.from_mapping(mapping, where), _manage_step, ptq.run,
              lambda m: "python -m quant.ptq", checkpoint="quantized.pt"),
    StageKind("export", lambda method, mapping, where: export.from_mapping(mapping, where), _manage_export,
              export.run, lambda m: "python export.py"),
)}
