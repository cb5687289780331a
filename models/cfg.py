"""Darknet cfg files: parse into typed blocks with darknet's defaults, validate, and write back.

A cfg is a ``[net]`` section followed by layer sections. ``ModelCfg.layers[i]`` is darknet's layer
``i``, the index that ``[route] layers=`` and ``[shortcut] from=`` count in. Every block keeps only
the options the file gave (typed), so ``write_cfg(parse_cfg(text))`` is as short as the input and
parse → write → parse is the identity. Defaults come from the schema below, copied from darknet's
``parser.c``: a block answers ``block["activation"]`` with the given value or darknet's default.

Anything the parser does not know (a section, a key, an activation, a value of the wrong type) is a
``UserError`` naming the file and line: a misspelt key must never turn into a silent default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.files import read_text
from utils.outputs import atomic_write

# Activations darknet names; models/layers.py maps each to a torch module.
ACTIVATIONS = ("linear", "leaky", "relu", "relu6", "mish", "swish", "logistic", "tanh", "elu", "selu",
               "gelu", "hard_mish")


class _ValueError(Exception):
    """A value that does not parse; the caller adds file, line and key."""


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise _ValueError(f"expected an integer, got {s!r}") from None


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise _ValueError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise _ValueError(f"expected a finite number, got {s!r}")
    return v


def _number(s: str) -> int | float:
    """An int when written as one, else a float (keeps ``batch=64`` an int and ``hue=.1`` a float)."""
    try:
        return int(s)
    except ValueError:
        return _float(s)


def _list(item: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(s: str) -> list:
        parts = [p.strip() for p in s.split(",")]
        if parts and parts[-1] == "":  # darknet tolerates a trailing comma
            parts.pop()
        if not parts or any(p == "" for p in parts):
            raise _ValueError(f"expected a comma-separated list, got {s!r}")
        return [item(p) for p in parts]
    parse.__name__ = f"list of {item.__name__.strip('_')}"
    return parse


def _str(s: str) -> str:
    return s


def _activation(s: str) -> str:
    if s not in ACTIVATIONS:
        raise _ValueError(f"unknown activation {s!r}; known: {', '.join(ACTIVATIONS)}")
    return s


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(s: str) -> str:
        if s not in allowed:
            raise _ValueError(f"expected one of {', '.join(allowed)}, got {s!r}")
        return s
    return parse


def _at_least(parse: Callable[[str], Any], low: float) -> Callable[[str], Any]:
    def check(s: str) -> Any:
        v = parse(s)
        for x in v if isinstance(v, list) else [v]:
            if x < low:
                raise _ValueError(f"must be >= {low}, got {s!r}")
        return v
    return check


def _probability(s: str) -> float:
    v = _float(s)
    if not 0 <= v < 1:
        raise _ValueError(f"must be in [0, 1), got {s!r}")
    return v


_ints = _list(_int)
_floats = _list(_float)
_positive = _at_least(_int, 1)
_flag = _choice("0", "1")


@dataclass(frozen=True)
class Option:
    """One key of a section: how to parse its text and darknet's default (a value or f(block))."""
    parse: Callable[[str], Any]
    default: Any = None


def _opt(parse: Callable[[str], Any], default: Any = None) -> Option:
    return Option(parse, default)


def _flagged(default: int = 0) -> Option:
    return Option(lambda s: int(_flag(s)), default)


# darknet keys that only the darknet trainer reads; kept and written back, typed as numbers.
_NET_NUMBERS = (
    "batch subdivisions width height channels inputs momentum decay learning_rate learning_rate_min "
    "batches_per_cycle batches_cycle_mult burn_in max_batches power gamma step scale angle saturation "
    "exposure hue aspect min_crop max_crop flip blur gaussian_noise mixup cutmix mosaic letter_box "
    "mosaic_bound label_smooth_eps resize_step ema_alpha optimized_memory workspace_size_limit_MB "
    "adam B1 B2 eps time_steps track augment_speed sequential_subdivisions "
    "init_sequential_subdivisions try_fix_nan loss_scale dynamic_minibatch max_chart_loss "
    "contrastive contrastive_jit_flip contrastive_color unsupervised attention adversarial_lr "
    "weights_reject_freq equidistant_point badlabels_rejection_percentage num_sigmas_reject_badlabels "
    "show_receptive_field"
).split()

SCHEMAS: dict[str, dict[str, Option]] = {
    "net": {
        **{k: _opt(_number) for k in _NET_NUMBERS},
        "width": _opt(_positive, 416),
        "height": _opt(_positive, 416),
        "channels": _opt(_positive, 3),
        "policy": _opt(_choice("constant", "step", "steps", "exp", "poly", "sig", "random", "sgdr"),
                       "constant"),
        "steps": _opt(_list(_number)),
        "scales": _opt(_floats),
        "seq_scales": _opt(_floats),
    },
    "convolutional": {
        "filters": _opt(_positive, 1),
        "size": _opt(_positive, 1),
        "stride": _opt(_positive, 1),
        "pad": _flagged(0),
        "padding": _opt(_at_least(_int, 0), 0),
        "groups": _opt(_positive, 1),
        "batch_normalize": _flagged(0),
        "activation": _opt(_activation, "logistic"),  # darknet's default, surprising as it is
        # 1: no gradient flows back through this layer; N > 1: only for the first N iterations
        "stopbackward": _opt(_at_least(_int, 0), 0),
    },
    "shortcut": {
        "from": _opt(_ints),
        "activation": _opt(_activation, "linear"),
    },
    "route": {
        "layers": _opt(_ints),
        "groups": _opt(_positive, 1),
        "group_id": _opt(_at_least(_int, 0), 0),
        "stopbackward": _opt(_at_least(_int, 0), 0),
    },
    "upsample": {
        "stride": _opt(_positive, 2),
        "scale": _opt(_float, 1.0),
    },
    "maxpool": {
        "stride": _opt(_positive, 1),
        "size": _opt(_positive, lambda b: b["stride"]),
        "padding": _opt(_at_least(_int, 0), lambda b: b["size"] - 1),
    },
    "avgpool": {},
    "dropout": {
        "probability": _opt(_probability, 0.5),
    },
    "scale_channels": {
        "from": _opt(_int),
        "activation": _opt(_activation, "linear"),
    },
    "sam": {
        "from": _opt(_int),
        "activation": _opt(_activation, "linear"),
    },
    "yolo": {
        "mask": _opt(_ints, lambda b: list(range(b["num"]))),
        "anchors": _opt(_floats),
        "classes": _opt(_positive, 20),
        "num": _opt(_positive, 1),
        "scale_x_y": _opt(_float, 1.0),
        "new_coords": _flagged(0),
        # training-only keys, kept for the trainer and written back
        "jitter": _opt(_float, 0.2),
        "ignore_thresh": _opt(_float, 0.5),
        "truth_thresh": _opt(_float, 1.0),
        "iou_thresh": _opt(_float, 1.0),
        "random": _opt(_float, 0),
        "resize": _opt(_float, 1.0),
        "max_delta": _opt(_float),
        "iou_loss": _opt(_choice("mse", "iou", "giou", "diou", "ciou"), "mse"),
        "iou_thresh_kind": _opt(_choice("iou", "giou", "diou", "ciou"), "iou"),
        "iou_normalizer": _opt(_float, 0.75),
        "cls_normalizer": _opt(_float, 1.0),
        "obj_normalizer": _opt(_float, 1.0),
        "delta_normalizer": _opt(_float, 1.0),
        "nms_kind": _opt(_choice("default", "greedynms", "diounms", "cornersnms"), "default"),
        "beta_nms": _opt(_float, 0.6),
        "objectness_smooth": _opt(_float, 0),
        "label_smooth_eps": _opt(_float, 0.0),
        "focal_loss": _flagged(0),
        "counters_per_class": _opt(_str),
        "max": _opt(_positive, 200),
    },
}

ALIASES = {"network": "net", "conv": "convolutional", "max": "maxpool", "avg": "avgpool"}

# Darknet keys this project knows but cannot reproduce: a clear "not supported" beats "unknown".
UNSUPPORTED = {
    "convolutional": ("dilation", "stride_x", "stride_y", "antialiasing", "binary", "xnor", "flipped",
                      "share_index", "assisted_excitation", "coordconv", "sway", "rotate", "stretch",
                      "stretch_sway", "dot", "cbn", "deform"),
    "shortcut": ("weights_type", "weights_normalization"),
    "maxpool": ("stride_x", "stride_y", "maxpool_depth", "out_channels", "antialiasing"),
    "scale_channels": ("scale_wh",),
    "dropout": ("dropblock", "dropblock_size_rel", "dropblock_size_abs"),
    "upsample": (),
}


@dataclass(eq=False)
class Block:
    """One cfg section: its type and the options the file gave, typed, in file order."""
    type: str
    options: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    source: str = "<cfg>"

    def __getitem__(self, key: str) -> Any:
        if key in self.options:
            return self.options[key]
        opt = SCHEMAS[self.type].get(key)
        if opt is None:
            raise KeyError(f"[{self.type}] has no option {key!r}")
        return opt.default(self) if callable(opt.default) else opt.default

    def __contains__(self, key: str) -> bool:
        return key in self.options

    def set(self, key: str, value: Any) -> None:
        """Set an option (pruning and class-count changes use this); the key must be in the schema."""
        if key not in SCHEMAS[self.type]:
            raise KeyError(f"[{self.type}] has no option {key!r}")
        self.options[key] = value

    def where(self) -> str:
        """``file:line [type]`` for messages."""
        return f"{self.source}:{self.line} [{self.type}]"

    def copy(self) -> Block:
        return Block(self.type, {k: list(v) if isinstance(v, list) else v
                                 for k, v in self.options.items()}, self.line, self.source)

    def __eq__(self, other: object) -> bool:  # where a block came from is not what it means
        return isinstance(other, Block) and (self.type, self.options) == (other.type, other.options)


@dataclass(eq=False)
class ModelCfg:
    """A parsed cfg: the ``[net]`` block and the layer blocks (``layers[i]`` is darknet layer i)."""
    net: Block
    layers: list[Block]
    source: str = "<cfg>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelCfg) and (self.net, self.layers) == (other.net, other.layers)

    def copy(self) -> ModelCfg:
        return ModelCfg(self.net.copy(), [b.copy() for b in self.layers], self.source)

    @property
    def heads(self) -> list[int]:
        """Indices of the ``[yolo]`` layers."""
        return [i for i, b in enumerate(self.layers) if b.type == "yolo"]

    @property
    def classes(self) -> int:
        """The class count of the heads (they must agree)."""
        counts = {self.layers[i]["classes"] for i in self.heads}
        if len(counts) != 1:
            raise UserError(f"{self.source}: the [yolo] heads disagree on classes ({sorted(counts)})"
                            if counts else f"{self.source}: the cfg has no [yolo] head")
        return counts.pop()


def _strip_comment(line: str) -> str:
    for mark in ("#", ";"):
        cut = line.find(mark)
        if cut >= 0:
            line = line[:cut]
    return line.strip()


def parse_cfg(text: str, source: str = "<cfg>") -> ModelCfg:
    """Parse cfg text. Raises UserError naming ``source:line`` for anything darknet would not mean."""
    blocks: list[Block] = []
    given_at: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        where = f"{source}:{lineno}"
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise UserError(f"{where}: malformed section header {raw.strip()!r}")
            name = line[1:-1].strip()
            name = ALIASES.get(name, name)
            if name not in SCHEMAS:
                raise UserError(f"{where}: unknown section [{name}]; this project supports "
                                f"{', '.join(f'[{s}]' for s in SCHEMAS)}")
            blocks.append(Block(name, {}, lineno, source))
            given_at = {}
            continue
        if "=" not in line:
            raise UserError(f"{where}: expected 'key=value' or a [section], got {raw.strip()!r}")
        if not blocks:
            raise UserError(f"{where}: option {raw.strip()!r} comes before the first [section]")
        key, value = (part.strip() for part in line.split("=", 1))
        block = blocks[-1]
        schema = SCHEMAS[block.type]
        if key not in schema:
            if key in UNSUPPORTED.get(block.type, ()):
                raise UserError(f"{where}: [{block.type}] option {key!r} is not supported by this project")
            raise UserError(f"{where}: unknown option {key!r} in [{block.type}]; known: "
                            f"{', '.join(sorted(schema))}")
        if key in given_at:
            raise UserError(f"{where}: option {key!r} given twice in [{block.type}] "
                            f"(first at line {given_at[key]})")
        if value == "":
            raise UserError(f"{where}: option {key!r} has no value")
        try:
            block.options[key] = schema[key].parse(value)
        except _ValueError as e:
            raise UserError(f"{where}: [{block.type}] {key}={value}: {e}") from None
        given_at[key] = lineno
    if not blocks:
        raise UserError(f"{source}: no sections found; is this a darknet cfg?")
    if blocks[0].type != "net":
        raise UserError(f"{source}:{blocks[0].line}: the first section must be [net], "
                        f"got [{blocks[0].type}]")
    extra_net = [b for b in blocks[1:] if b.type == "net"]
    if extra_net:
        raise UserError(f"{source}:{extra_net[0].line}: a second [net] section")
    if len(blocks) == 1:
        raise UserError(f"{source}: the cfg has a [net] section but no layers")
    cfg = ModelCfg(blocks[0], blocks[1:], source)
    for block in cfg.layers:
        _check_block(block)
    return cfg


def _check_block(b: Block) -> None:
    """Checks within one block; checks across blocks live in models/shapes.py."""
    if b.type in ("shortcut", "scale_channels", "sam") and "from" not in b:
        raise UserError(f"{b.where()}: needs 'from='")
    if b.type == "route":
        if "layers" not in b:
            raise UserError(f"{b.where()}: needs 'layers='")
        if b["group_id"] >= b["groups"]:
            raise UserError(f"{b.where()}: group_id={b['group_id']} must be < groups={b['groups']}")
    if b.type == "yolo":
        if "anchors" not in b:
            raise UserError(f"{b.where()}: needs 'anchors='")
        anchors, num = b["anchors"], b["num"]
        if len(anchors) != 2 * num:
            raise UserError(f"{b.where()}: anchors has {len(anchors)} numbers but num={num} needs "
                            f"{2 * num}")
        if any(a <= 0 for a in anchors):
            raise UserError(f"{b.where()}: anchors must be positive")
        bad = [m for m in b["mask"] if not 0 <= m < num]
        if bad:
            raise UserError(f"{b.where()}: mask indices {bad} are outside 0..{num - 1} (num={num})")


def read_cfg(path: str | Path) -> ModelCfg:
    """Read and parse a cfg file."""
    return parse_cfg(read_text(path, "cfg"), str(path))


def _format(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_format(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_block(block: Block) -> Iterable[str]:
    yield f"[{block.type}]"
    options = dict(block.options)
    if block.type == "convolutional":
        # darknet's default activation is logistic, OpenCV's is linear: always say which.
        options.setdefault("activation", block["activation"])
    for key, value in options.items():
        yield f"{key}={_format(value)}"


def write_cfg(cfg: ModelCfg) -> str:
    """Cfg text that darknet, OpenCV and this parser read as ``cfg``."""
    out: list[str] = []
    for i, block in enumerate([cfg.net, *cfg.layers]):
        if i:
            out.append(f"\n# layer {i - 1}")
        out.extend(_write_block(block))
    return "\n".join(out) + "\n"


def save_cfg(cfg: ModelCfg, path: str | Path) -> None:
    atomic_write(path, write_cfg(cfg))
