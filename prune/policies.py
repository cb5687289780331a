"""How a method chooses: channel masks from the BN scales γ, or the residual blocks to drop.

A *unit* is a set of convs whose channels are tied (a residual chain, or one conv split by a grouped
``[route]``), or one untied conv; a *group* is a set of tied channels, kept or removed together. What a
method declares (:mod:`prune.methods`) sets the rest:

- its candidate convs: untied only (``normal``, ``regular``) or tied ones too (``shortcut``, ``slim``);
- its group score: the best member's |γ| (a group stays when any member is above the threshold: the
  union of the members' masks, ``slim``), or the γ of the chain's first conv (``shortcut``);
- whether kept widths are rounded: each conv keeps its top channels by |γ|, their count rounded up
  to a multiple of ``round_to`` (widths the CPU kernels like; ``regular`` by default, any channel method
  with ``--round-to``).

The global threshold is the ``percent`` quantile of |γ| over all candidate channels. Every unit keeps
at least ``max(1, ceil(layer_keep · groups))`` groups, its best by score: a ``percent`` that would
empty a layer is floored there instead, and :attr:`ChannelPlan.safe_percent` says where that starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from models.cfg import ModelCfg
from models.darknet import Darknet
from models.graph import ChannelGraph
from prune.blocks import ResidualBlock, residual_blocks
from prune.engine import Masks
from utils.errors import UserError

if TYPE_CHECKING:
    from prune.methods import PruneMethod


@dataclass
class ChannelPlan:
    masks: Masks
    threshold: float
    safe_percent: float  # the largest percent at which no unit needs its floor to keep a channel
    floored: list[str] = field(default_factory=list)  # units whose floor kept more than the threshold
    round_to: int = 1
    rounded: int = 0  # channel groups at or below the threshold kept to round widths up to round_to
    widths_from: str = ""  # a cfg whose widths were taken instead of a threshold (:func:`width_plan`)

    def summary(self) -> str:
        if self.widths_from:
            return (f"widths of {self.widths_from}: every layer keeps that many of its channels, the best "
                    f"by the method's score (|gamma|)")
        lines = [f"threshold |gamma| <= {self.threshold:.4g}; the largest percent that leaves every layer "
                 f"a channel without a floor: {self.safe_percent:.1%}"]
        if self.rounded:
            lines.append(f"widths rounded up to multiples of {self.round_to}: {self.rounded} channel "
                         f"group(s) at or below the threshold kept (--round-to 1: none)")
        if self.floored:
            lines.append(f"per-layer floor applied to {len(self.floored)} layer(s): "
                         f"{', '.join(self.floored)}")
        return "\n".join(lines)


Unit = list[list[tuple[int, int]]]  # a unit's channel groups, each its (conv, channel) members in order


def channel_units(graph: ChannelGraph, convs: list[int]) -> list[Unit]:
    """The channels of ``convs`` in units (convs tied to each other) of groups (channels tied to each
    other: kept or removed together); a group's members are sorted, so the first is the chain's first
    conv. Only members among ``convs`` are listed."""
    members: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in sorted(convs):
        for c in range(graph.cfg.layers[i]["filters"]):
            members.setdefault(graph.group(i, c), []).append((i, c))
    units: dict[frozenset[int], Unit] = {}
    for chans in members.values():
        units.setdefault(frozenset({chans[0][0], *graph.tied_convs(chans[0][0])}), []).append(chans)
    return list(units.values())


def group_score(values: torch.Tensor, how: str) -> float:
    """A channel group's score from its members' |γ| in member order: the best (``max``) or the chain's
    first conv's (``first``)."""
    return float(values[0] if how == "first" else values.max())


def _gamma(model: Darknet, conv: int) -> torch.Tensor:
    return model.layers[conv].bn.weight.detach().abs().cpu().double()


def channel_plan(model: Darknet, method: PruneMethod, percent: float, layer_keep: float = 0.01,
                 round_to: int | None = None) -> ChannelPlan:
    """The masks ``method`` chooses at ``percent`` (0..1) of the candidate channels' |γ|; kept widths
    rounded up to a multiple of ``round_to`` (None: the method's default)."""
    if not method.channels:
        raise UserError(f"{method.name} pruning removes no channels")
    if not 0 <= percent < 1:
        raise UserError(f"--percent {percent}: must be in [0, 1)")
    if not 0 <= layer_keep <= 1:
        raise UserError(f"--layer-keep {layer_keep}: must be in [0, 1]")
    round_to = method.round_to if round_to is None else round_to
    if round_to < 1:
        raise UserError(f"--round-to {round_to}: must be >= 1")
    graph, convs, gammas = _candidates(model, method)
    everything = torch.cat(list(gammas.values()))
    threshold = float(torch.quantile(everything, percent)) if percent > 0 else -1.0

    keep: dict[tuple[int, int], bool] = {}
    floored = []
    rounded = 0
    safe = float("inf")
    for unit, scores, ranked in _ranked_units(graph, method, convs, gammas):
        safe = min(safe, scores[ranked[0]])
        n_keep = sum(score > threshold for score in scores)
        floor = max(1, math.ceil(layer_keep * len(unit)))
        if n_keep < floor:
            n_keep = floor
            floored.append(model.cfg.layers[unit[0][0][0]].where())
        if round_to > 1:
            wide = min(len(unit), math.ceil(n_keep / round_to) * round_to)
            rounded += wide - n_keep
            n_keep = wide
        for rank, k in enumerate(ranked):
            keep.update(dict.fromkeys(unit[k], rank < n_keep))
    safe_percent = float((everything < safe).double().mean())
    return ChannelPlan(_masks(keep, gammas), threshold, safe_percent, floored, round_to, rounded)


def width_plan(model: Darknet, method: PruneMethod, target: ModelCfg) -> ChannelPlan:
    """The masks that give ``model`` the conv widths of ``target`` (a cut of the same network, e.g. one
    timed with ``bench.speed`` before training): every unit keeps as many of its channel groups as
    the target's widths need (:func:`unit_keeps`), the best by the method's score."""
    keeps = unit_keeps(model.cfg, method, target)
    graph, convs, gammas = _candidates(model, method)
    keep: dict[tuple[int, int], bool] = {}
    for (unit, _, ranked), n_keep in zip(_ranked_units(graph, method, convs, gammas), keeps, strict=True):
        for rank, k in enumerate(ranked):
            keep.update(dict.fromkeys(unit[k], rank < n_keep))
    return ChannelPlan(_masks(keep, gammas), float("nan"), 0.0, widths_from=str(target.source))


def unit_keeps(cfg: ModelCfg, method: PruneMethod, target: ModelCfg) -> list[int]:
    """How many channel groups each unit of ``method``'s candidate convs keeps (in
    :func:`channel_units` order) to give ``cfg`` the conv widths of ``target``: what pruning with
    ``--widths-from`` keeps, and what sparse training with ``--sr-keep-from`` spares. A target that
    differs in anything but narrower widths of convs the method may cut is a UserError naming its
    block."""
    _same_network_but_widths(cfg, target, method)
    graph, convs = _cut_convs(cfg, method)
    for i, (mine, theirs) in enumerate(zip(cfg.layers, target.layers)):
        if mine.type == "convolutional" and i not in convs and theirs["filters"] != mine["filters"]:
            raise UserError(f"{theirs.where()}: filters={theirs['filters']}, but {method.name} pruning does "
                            f"not cut this conv: it keeps {mine['filters']}")
    keeps = []
    for unit in channel_units(graph, convs):
        per: dict[int, int] = {}  # channels of each conv in one group (a grouped [route] puts several)
        for i, _ in unit[0]:
            per[i] = per.get(i, 0) + 1
        counts = set()
        for i, n in per.items():
            block, filters = target.layers[i], target.layers[i]["filters"]
            if filters % n or not n <= filters <= n * len(unit):
                step = f" in steps of {n} (a grouped [route] splits it)" if n > 1 else ""
                raise UserError(f"{block.where()}: filters={filters}; a cut of this conv keeps {n} to "
                                f"{n * len(unit)} channels{step}")
            counts.add(filters // n)
        if len(counts) > 1:
            tied = ", ".join(map(str, sorted(per)))
            raise UserError(f"{target.layers[min(per)].where()}: the convs tied to it (layers {tied}) are "
                            f"cut to different widths; tied convs keep one width")
        keeps.append(counts.pop())
    return keeps


def _same_network_but_widths(cfg: ModelCfg, target: ModelCfg, method: PruneMethod) -> None:
    if len(target.layers) != len(cfg.layers) or target.net["channels"] != cfg.net["channels"]:
        raise UserError(f"{target.source}: {len(target.layers)} layers on {target.net['channels']} input "
                        f"channels, {cfg.source} has {len(cfg.layers)} on {cfg.net['channels']}: not a cut "
                        f"of this network")
    for mine, theirs in zip(cfg.layers, target.layers):
        if mine.type != theirs.type:
            raise UserError(f"{theirs.where()}: {cfg.source} has [{mine.type}] here: not a cut of this "
                            f"network")
        for key in sorted((set(mine.options) | set(theirs.options)) - {"filters"}):
            if mine[key] != theirs[key]:
                raise UserError(f"{theirs.where()}: {key}={theirs[key]}, {cfg.source} has {mine[key]}: a "
                                f"cut for {method.name} pruning changes only filters")


Gammas = dict[int, torch.Tensor]  # |γ| of each candidate conv


def _cut_convs(cfg: ModelCfg, method: PruneMethod) -> tuple[ChannelGraph, list[int]]:
    """The cfg's channel graph and the convs ``method`` may cut (none: a UserError)."""
    graph = ChannelGraph(cfg)
    convs = method.channel_convs(graph)
    if not convs:
        raise UserError(f"{cfg.source}: no conv that {method.name} pruning may cut (every conv feeds "
                        f"a head, lacks batch norm or is tied)")
    return graph, convs


def _candidates(model: Darknet, method: PruneMethod) -> tuple[ChannelGraph, list[int], Gammas]:
    """The model's channel graph, the convs ``method`` may cut, and each one's |γ|."""
    graph, convs = _cut_convs(model.cfg, method)
    return graph, convs, {i: _gamma(model, i) for i in convs}


def _ranked_units(graph: ChannelGraph, method: PruneMethod, convs: list[int], gammas: Gammas):
    """Each unit of ``convs``, its groups' scores, and the group indices best first."""
    for unit in channel_units(graph, convs):
        scores = [group_score(torch.stack([gammas[i][c] for i, c in chans]), method.group_score)
                  for chans in unit]
        yield unit, scores, sorted(range(len(unit)), key=lambda k: -scores[k])


def _masks(keep: dict[tuple[int, int], bool], gammas: Gammas) -> Masks:
    return {i: torch.tensor([keep[(i, c)] for c in range(len(g))]) for i, g in gammas.items()}


def block_score(model: Darknet, block: ResidualBlock) -> float:
    """Mean |γ| over the branch convs that have batch norm (inf when none has: never chosen first)."""
    gs = [_gamma(model, c) for c in block.convs if model.cfg.layers[c]["batch_normalize"]]
    return float(torch.cat(gs).mean()) if gs else float("inf")


def lowest_blocks(model: Darknet, n: int) -> list[ResidualBlock]:
    """The ``n`` removable residual blocks with the lowest :func:`block_score`, in cfg order (of two
    nested blocks only the lower-scored one)."""
    blocks = residual_blocks(model.cfg)
    if not blocks:
        raise UserError(f"{model.cfg.source}: no residual block ([shortcut] with a removable branch) to "
                        f"prune; use a channel-pruning method for this cfg")
    if not 1 <= n <= len(blocks):
        raise UserError(f"--shortcuts {n}: {model.cfg.source} has {len(blocks)} removable residual "
                        f"blocks; choose 1..{len(blocks)}")
    chosen: list[ResidualBlock] = []
    for b in sorted(blocks, key=lambda b: block_score(model, b)):  # nested blocks: the weaker one
        if len(chosen) < n and not any(set(b.layers) & set(c.layers) for c in chosen):
            chosen.append(b)
    if len(chosen) < n:
        raise UserError(f"--shortcuts {n}: {model.cfg.source}'s residual blocks are nested; at most "
                        f"{len(chosen)} can be removed together")
    return sorted(chosen, key=lambda b: b.shortcut)
