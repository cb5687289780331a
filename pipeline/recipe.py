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

``run`` picks the script (``train``: train.py, ``prune``: prune/<method>_prune.py, ``ptq``: quant/ptq.py,
``export``: export.py); every other key is one of that script's flags without its dashes (``sr-schedule``
and ``sr_schedule`` both work); ``true`` switches a flag on, a list gives several values. Each stage
starts from the checkpoint of the stage before it (``from: <stage>`` picks another); ``t_weights: <stage>``
names a teacher by stage. The pipeline sets ``--weights``, the output folder and the run-wide keys
itself, so a recipe may not.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError
from utils.files import read_text

RUN_KEYS = ("description", "data", "cfg", "img_size", "device", "stages")
STAGE_KEYS = ("run", "from", "method")  # the pipeline's own keys; the rest are script flags
MANAGED = {"weights", "project", "name", "exist_ok", "output", "resume", "data", "img_size", "device", "cfg"}
STAGE_REFERENCES = ("t_weights",)  # flags whose value may name a stage (its checkpoint)


@dataclass(frozen=True)
class Script:
    """How a stage kind runs: its flags, its entry point and where it leaves its checkpoint."""

    parser: Callable[[str], argparse.ArgumentParser]  # method -> the script's parser
    main: Callable[[str, list[str]], object]  # (method, argv) -> result
    checkpoint: str | None  # path of the output .pt inside the stage folder; None: no checkpoint
    command: Callable[[str], str]  # method -> how a user runs the script by hand


def _train_parser(method: str) -> argparse.ArgumentParser:
    import train

    return train.build_parser()


def _train_main(method: str, argv: list[str]) -> object:
    import train

    return train.main(argv)


def _prune_parser(method: str) -> argparse.ArgumentParser:
    from prune import cli

    return cli.build_parser(method)


def _prune_main(method: str, argv: list[str]) -> object:
    from prune import cli

    return cli.main(method, argv)


def _ptq_parser(method: str) -> argparse.ArgumentParser:
    from quant import ptq

    return ptq.build_parser()


def _ptq_main(method: str, argv: list[str]) -> object:
    from quant import ptq

    return ptq.main(argv)


def _export_parser(method: str) -> argparse.ArgumentParser:
    import export

    return export.build_parser()


def _export_main(method: str, argv: list[str]) -> object:
    import export

    return export.main(argv)


SCRIPTS = {
    "train": Script(_train_parser, _train_main, "weights/last.pt", lambda m: "python train.py"),
    "prune": Script(_prune_parser, _prune_main, "pruned.pt", lambda m: f"python prune/{m}_prune.py"),
    "ptq": Script(_ptq_parser, _ptq_main, "quantized.pt", lambda m: "python -m quant.ptq"),
    "export": Script(_export_parser, _export_main, None, lambda m: "python export.py"),
}


@dataclass
class Stage:
    name: str
    run: str
    options: dict[str, Any]  # the script flags, as the recipe wrote them
    source: str | None  # the stage whose checkpoint this one starts from (None: the first stage)
    method: str = ""  # prune stages

    @property
    def script(self) -> Script:
        return SCRIPTS[self.run]

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


def _flag(parser: argparse.ArgumentParser, key: str) -> argparse.Action | None:
    wanted = {f"--{key}", f"--{key.replace('_', '-')}", f"--{key.replace('-', '_')}", f"-{key}"}
    for action in parser._actions:
        if wanted & set(action.option_strings):
            return action
    return None


def flag_argv(parser: argparse.ArgumentParser, options: dict[str, Any], where: str) -> list[str]:
    """``options`` (recipe keys → values) as the argv of ``parser``'s script; unknown keys are errors."""
    argv: list[str] = []
    for key, value in options.items():
        action = _flag(parser, key)
        if action is None:
            known = sorted(a.option_strings[-1].lstrip("-") for a in parser._actions
                           if a.option_strings and a.dest != "help")
            raise UserError(f"{where}: '{key}' is not a flag of {parser.prog} (flags: {', '.join(known)})")
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else \
            action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            positive = next(s for s in action.option_strings if not s.startswith("--no-"))
            if not isinstance(value, bool):
                raise UserError(f"{where}: '{key}' takes true or false, not {value!r}")
            argv.append(positive if value else "--no-" + positive[2:])
        elif action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise UserError(f"{where}: '{key}' takes true or false, not {value!r}")
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, (dict, bool)) or value is None:
            raise UserError(f"{where}: '{key}' takes a value, not {value!r}")
        else:
            argv += [flag, str(value)]
    return argv


def _stage(recipe_path: Path, name: str, body: Any, previous: str | None, names: list[str]) -> Stage:
    where = f"{recipe_path}: stage '{name}'"
    if not isinstance(body, dict) or "run" not in body:
        raise UserError(f"{where}: expected a mapping with 'run: {'|'.join(SCRIPTS)}'")
    run = body["run"]
    if run not in SCRIPTS:
        raise UserError(f"{where}: run '{run}' is not one of {', '.join(SCRIPTS)}")
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
    # every flag and value is checked by the script's own parser now, not an hour into the run
    parser = stage.script.parser(method)
    argv = flag_argv(parser, {k: ("x.pt" if k in STAGE_REFERENCES and v in names else v)
                              for k, v in options.items()}, where)
    argv += {"train": [], "export": ["--weights", "x.pt"]}.get(run, ["--weights", "x.pt", "--data", "x.data"])
    try:
        parser.parse_args(argv)
    except SystemExit:
        raise UserError(f"{where}: {parser.prog} rejects {' '.join(argv)} (its message is above)") from None
    return stage


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe: every stage's flags are validated by its script's parser."""
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
        if stage.script.checkpoint:
            previous = stage.name
    img_size = raw.get("img_size", 224)
    if not isinstance(img_size, int) or img_size <= 0:
        raise UserError(f"{path}: img_size must be a positive integer, not {img_size!r}")
    return Recipe(path, stages, data=str(raw.get("data") or ""), cfg=str(raw.get("cfg") or ""),
                  img_size=img_size, device=str(raw.get("device") or ""),
                  description=str(raw.get("description") or ""))
