"""Recipes: a YAML file naming the stages of a compression run and their options.

A recipe is a mapping with a few run-wide keys and an ordered ``stages`` mapping::

    data: ""                    # .data file; empty: the built-in shapes benchmark
    cfg: cfg/yolo-small.cfg     # the model of the first stage (when it trains from scratch)
    img_size: 160               # training, evaluation and export size of every stage
    device: ""                  # train.py --device
    stages:
      baseline: {run: train, epochs: 14}
      sparse:   {run: train, sr: true, s: 0.005, prune: 1, sr-schedule: global, epochs: 6}
      prune:    {run: prune, method: slim, percent: 0.5, recalibrate: 20}
      finetune: {run: train, hyp: data/hyp.finetune.yaml, epochs: 4, t_weights: baseline, KDstr: 3}
      ...

``run`` picks the stage kind (:mod:`stages.registry`: ``train`` as train.py, ``prune`` as
prune/<method>_prune.py, ``ptq`` as quant/ptq.py, ``export`` as export.py); every other key is one of
that script's flags without its dashes (``sr-schedule`` and ``sr_schedule`` both work), checked as the
flag is; ``true`` switches a flag on, a list gives several values. Each stage
starts from the checkpoint of the stage before it (``from: <stage>`` picks another); ``t_weights: <stage>``
names a teacher by stage. The pipeline sets ``--weights``, the output folder and the run-wide keys
itself, so a recipe may not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.registry import KINDS, MANAGED, StageKind
from utils.errors import UserError
from utils.files import read_text

RUN_KEYS = ("description", "data", "cfg", "img_size", "device", "stages")
STAGE_KEYS = ("run", "from", "method")  # the pipeline's own keys; the rest are script flags
STAGE_REFERENCES = ("t_weights",)  # flags whose value may name a stage (its checkpoint)


@dataclass
class Stage:
    name: str
    run: str
    options: dict[str, Any]  # the script flags, as the recipe wrote them
    source: str | None  # the stage whose checkpoint this one starts from (None: the first stage)
    method: str = ""  # prune stages

    @property
    def kind(self) -> StageKind:
        return KINDS[self.run]

    def signature(self) -> dict[str, Any]:
        """What the stage was asked to do: compared with the record of an earlier run before skipping it."""
        return {"run": self.run, "method": self.method, "from": self.source, "options": self.options}


@dataclass
class Recipe:
    path: Path
    stages: list[Stage]
    data: str = ""
    cfg: str = ""
    img_size: int = 224
    device: str = ""
    description: str = ""

    def index(self, name: str) -> int:
        for k, s in enumerate(self.stages):
            if s.name == name:
                return k
        raise UserError(f"{self.path}: no stage '{name}' (stages: {', '.join(s.name for s in self.stages)})")


def _stage(recipe_path: Path, name: str, body: Any, previous: str | None, names: list[str]) -> Stage:
    where = f"{recipe_path}: stage '{name}'"
    if not isinstance(body, dict) or "run" not in body:
        raise UserError(f"{where}: expected a mapping with 'run: {'|'.join(KINDS)}'")
    run = body["run"]
    if run not in KINDS:
        raise UserError(f"{where}: run '{run}' is not one of {', '.join(KINDS)}")
    options = {k: v for k, v in body.items() if k not in STAGE_KEYS}
    for key in options:
        if key.replace("-", "_") in MANAGED:
            raise UserError(f"{where}: '{key}' is set by compress.py (the run-wide keys are "
                            f"{', '.join(RUN_KEYS[1:-1])}; 'from: <stage>' picks the input)")
    source = body.get("from", previous)
    if source is not None and source not in names[:names.index(name)]:
        raise UserError(f"{where}: 'from: {source}' must name an earlier stage")
    if source is None and run != "train":
        raise UserError(f"{where}: the first stage must train (or be replaced by compress.py --weights)")
    method = body.get("method", "")
    if run == "prune":
        from prune.methods import METHODS

        if method not in METHODS:
            raise UserError(f"{where}: 'method' must be one of {', '.join(METHODS)}, not {method!r}")
    elif method:
        raise UserError(f"{where}: 'method' applies to prune stages only")
    for key in STAGE_REFERENCES:
        ref = options.get(key)
        if isinstance(ref, str) and ref in names and names.index(ref) >= names.index(name):
            raise UserError(f"{where}: '{key}: {ref}' must name an earlier stage")
    stage = Stage(name, run, options, source, method)
    # every key and value is checked now, as its script's flag would be, not an hour into the run
    stage.kind.from_mapping(method, options, where)
    return stage


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe: every stage's keys are checked as its script's flags are."""
    path = Path(path)
    try:
        raw = yaml.safe_load(read_text(path, "--recipe"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise UserError(f"{path}: expected a mapping with a non-empty 'stages' mapping")
    unknown = sorted(set(raw) - set(RUN_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}' (keys: {', '.join(RUN_KEYS)})")
    names = [str(n) for n in raw["stages"]]
    stages, previous = [], None
    for name, body in raw["stages"].items():
        stage = _stage(path, str(name), body, previous, names)
        stages.append(stage)
        if stage.kind.checkpoint:
            previous = stage.name
    img_size = raw.get("img_size", 224)
    if not isinstance(img_size, int) or img_size <= 0:
        raise UserError(f"{path}: img_size must be a positive integer, not {img_size!r}")
    return Recipe(path, stages, data=str(raw.get("data") or ""), cfg=str(raw.get("cfg") or ""),
                  img_size=img_size, device=str(raw.get("device") or ""),
                  description=str(raw.get("description") or ""))
