"""The six pruning methods, one registry: what each may cut, how it ranks, and what sparse training
must penalize for it.

A :class:`PruneMethod` declares

- whether it cuts channels, and then which convs are candidates (``include_tied``: residual chains
  and convs split by a grouped route too) and how a group of tied channels is scored (``max`` over its
  members, or the γ of the chain's ``first`` conv), and whether kept widths are rounded
  by default (``round_to``, the default of ``--round-to``, which every channel method accepts);
- whether it removes whole residual blocks (``--shortcuts`` of them);
- from these, :meth:`PruneMethod.penalized_convs`: the batch norms sparse training
  (``train.py -sr --prune-method M``) must push towards zero so that M can cut them later.

:func:`plan` turns a method and a model into a :class:`PrunePlan` (channel masks and residual blocks);
:func:`apply_plan` has the engine (:mod:`prune.engine`) make the smaller model. The scripts, the
sparsity hook, recipe validation and the tests all read :data:`METHODS`; a seventh method is one entry
here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.cfg import ModelCfg
from models.darknet import Darknet
from models.graph import ChannelGraph
from prune.blocks import ResidualBlock, channel_candidates, residual_blocks
from prune.engine import prune_channels, remove_blocks
from prune.policies import ChannelPlan, channel_plan, lowest_blocks, width_plan
from utils.errors import UserError


@dataclass(frozen=True)
class PruneMethod:
    name: str
    summary: str
    channels: bool = True  # cuts output channels of convs
    include_tied: bool = False  # residual chains and grouped-route splits are candidates too
    group_score: str = "max"  # "max" over a group's members, or the chain's "first" conv
    # default --round-to: kept widths rounded up to a multiple of it. 16: on the project's CPU a 3x3 conv
    # of 64 channels ran faster than one of any width from 49 to 63 (bench.widths, docs/pruning.md)
    round_to: int = 16
    blocks: bool = False  # removes whole residual blocks (--shortcuts of them)

    @property
    def takes_widths(self) -> bool:
        """Whether a cut cfg can say its widths (``--widths-from``, ``--sr-keep-from``): it cuts channels
        and removes no blocks, so the cut is the same network with narrower convs."""
        return self.channels and not self.blocks

    def channel_convs(self, graph: ChannelGraph) -> list[int]:
        """The convs whose output channels this method may cut."""
        return channel_candidates(graph, self.include_tied) if self.channels else []

    def block_convs(self, cfg: ModelCfg) -> list[int]:
        """The convs (with batch norm: the ranked ones) of the residual blocks this method may remove."""
        if not self.blocks:
            return []
        return sorted({c for b in residual_blocks(cfg) for c in b.convs if cfg.layers[c]["batch_normalize"]})

    def penalized_convs(self, cfg: ModelCfg) -> list[int]:
        """The convs whose batch-norm γ sparse training penalizes for this method: exactly what it ranks."""
        return sorted({*self.channel_convs(ChannelGraph(cfg)), *self.block_convs(cfg)})


METHODS: dict[str, PruneMethod] = {m.name: m for m in (
    PruneMethod("normal", "global |gamma| threshold over convs no shortcut ties (residual chains stay "
                          "whole)"),
    PruneMethod("shortcut", "every conv of a residual chain takes the mask of the chain's first conv",
                include_tied=True, group_score="first"),
    PruneMethod("slim", "global threshold with a per-layer floor; a chain keeps the union of its members' "
                        "masks", include_tied=True),
    PruneMethod("regular", "normal's convs, kept widths rounded up to a multiple of --round-to (8)",
                round_to=8),
    PruneMethod("layer", "remove the --shortcuts residual blocks with the lowest mean |gamma|",
                channels=False, blocks=True),
    PruneMethod("layer_channel", "slim channel pruning, then layer pruning", include_tied=True, blocks=True),
)}

# the older tools' ``train.py -sr --prune N``: which method's batch norms it penalized
SPARSITY_ALIASES = {0: "normal", 1: "slim", 2: "layer"}


def method(name: str) -> PruneMethod:
    m = METHODS.get(name)
    if m is None:
        raise UserError(f"unknown pruning method {name!r}; known: {', '.join(METHODS)}")
    return m


@dataclass
class PrunePlan:
    """What one method removes from one model: channel masks (None: no channel pruning) and blocks."""
    method: PruneMethod
    channels: ChannelPlan | None
    blocks: list[ResidualBlock] = field(default_factory=list)

    def notes(self) -> list[str]:
        lines = []
        if self.channels is not None:
            removed = sum(int((~m).sum()) for m in self.channels.masks.values())
            total = sum(m.numel() for m in self.channels.masks.values())
            lines += [self.channels.summary(), f"channels removed: {removed} of {total} candidates in "
                                               f"{len(self.channels.masks)} convs"]
        if self.blocks:
            lines.append("residual blocks removed (shortcut layer, from): "
                         + ", ".join(f"{b.shortcut} ({b.source})" for b in self.blocks))
        return lines


def plan(model: Darknet, m: PruneMethod | str, percent: float = 0.5, layer_keep: float = 0.01,
         round_to: int | None = None, shortcuts: int = 2, widths: ModelCfg | None = None) -> PrunePlan:
    """What method ``m`` removes from ``model`` at these settings (nothing is changed yet); ``round_to``
    None: the method's default; ``widths``: the conv widths of that cfg instead of a threshold."""
    m = method(m) if isinstance(m, str) else m
    if widths is not None and not m.takes_widths:
        raise UserError(f"{m.name} pruning {'removes blocks' if m.blocks else 'removes no channels'}: it "
                        f"cannot take the widths of {widths.source}")
    channels = None
    if m.channels:
        channels = width_plan(model, m, widths) if widths is not None else \
            channel_plan(model, m, percent, layer_keep, round_to)
    blocks = lowest_blocks(model, shortcuts) if m.blocks else []
    return PrunePlan(m, channels, blocks)


def apply_plan(model: Darknet, p: PrunePlan, compensate: bool = True) -> Darknet:
    """The smaller model without what ``p`` removes (``model`` is untouched): channels first, then
    blocks (channel pruning keeps layer indices, so the blocks still point where they did)."""
    out = prune_channels(model, p.channels.masks, compensate) if p.channels is not None else model
    return remove_blocks(out, p.blocks, compensate) if p.blocks else out
