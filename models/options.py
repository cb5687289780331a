"""The value types of cfg options: how each option's text is parsed and checked, and its default.

A parse function takes the option's text and returns its typed value or raises :class:`ValueProblem`
(the cfg parser adds the file, line and key). The layer kinds (:mod:`models.kinds`) build their
schemas from these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Activations darknet names; models/layers.py maps each to a torch module.
ACTIVATIONS = ("linear", "leaky", "relu", "relu6", "mish", "swish", "logistic", "tanh", "elu", "selu",
               "gelu", "hard_mish")


class ValueProblem(Exception):
    """A value that does not parse; the caller adds file, line and key."""


def int_value(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise ValueProblem(f"expected an integer, got {s!r}") from None


def float_value(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise ValueProblem(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise ValueProblem(f"expected a finite number, got {s!r}")
    return v


def number(s: str) -> int | float:
    """An int when written as one, else a float (keeps ``batch=64`` an int and ``hue=.1`` a float)."""
    try:
        return int(s)
    except ValueError:
        return float_value(s)


def list_of(item: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(s: str) -> list:
        parts = [p.strip() for p in s.split(",")]
        if parts and parts[-1] == "":  # darknet tolerates a trailing comma
            parts.pop()
        if not parts or any(p == "" for p in parts):
            raise ValueProblem(f"expected a comma-separated list, got {s!r}")
        return [item(p) for p in parts]
    parse.__name__ = f"list of {item.__name__}"
    return parse


def text(s: str) -> str:
    return s


def activation_name(s: str) -> str:
    if s not in ACTIVATIONS:
        raise ValueProblem(f"unknown activation {s!r}; known: {', '.join(ACTIVATIONS)}")
    return s


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(s: str) -> str:
        if s not in allowed:
            raise ValueProblem(f"expected one of {', '.join(allowed)}, got {s!r}")
        return s
    return parse


def at_least(parse: Callable[[str], Any], low: float) -> Callable[[str], Any]:
    def check(s: str) -> Any:
        v = parse(s)
        for x in v if isinstance(v, list) else [v]:
            if x < low:
                raise ValueProblem(f"must be >= {low}, got {s!r}")
        return v
    return check


def probability(s: str) -> float:
    v = float_value(s)
    if not 0 <= v < 1:
        raise ValueProblem(f"must be in [0, 1), got {s!r}")
    return v


INTS = list_of(int_value)
FLOATS = list_of(float_value)
POSITIVE = at_least(int_value, 1)
FLAG = choice("0", "1")


@dataclass(frozen=True)
class Option:
    """One key of a section: how to parse its text and darknet's default (a value or f(block))."""
    parse: Callable[[str], Any]
    default: Any = None


def opt(parse: Callable[[str], Any], default: Any = None) -> Option:
    return Option(parse, default)


def flag_option(default: int = 0) -> Option:
    return Option(lambda s: int(FLAG(s)), default)


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

NET_SCHEMA: dict[str, Option] = {
    **{k: opt(number) for k in _NET_NUMBERS},
    "width": opt(POSITIVE, 416),
    "height": opt(POSITIVE, 416),
    "channels": opt(POSITIVE, 3),
    "policy": opt(choice("constant", "step", "steps", "exp", "poly", "sig", "random", "sgdr"), "constant"),
    "steps": opt(list_of(number)),
    "scales": opt(FLOATS),
    "seq_scales": opt(FLOATS),
}
