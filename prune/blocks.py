"""What each pruning method may touch: prunable convs (channel pruning) and residual blocks (layer pruning).

Both come from the cfg alone (through :class:`models.graph.ChannelGraph`), so sparse training
(``--prune 0|1|2``) penalizes exactly the batch norms that the pruning scripts later rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.cfg import ModelCfg
from models.graph import ChannelGraph
from models.shapes import layer_inputs


def channel_candidates(graph: ChannelGraph, include_tied: bool) -> list[int]:
    """Convs whose output channels a channel-pruning method may remove.

    Never a conv that :meth:`ChannelGraph.fixed_reason` fixes (a head conv, no batch norm, grouped).
    Without ``include_tied`` (normal, regular) also never a conv tied to another channel: residual
    chains and the convs split by a grouped ``[route]`` stay whole.
    """
    return [i for i in graph.convs if graph.fixed_reason(i) is None
            and (include_tied or not graph.is_tied(i))]


@dataclass(frozen=True)
class ResidualBlock:
    """``[shortcut]`` layer ``shortcut`` adds the branch ``source+1 .. shortcut-1`` to layer ``source``.

    Removing the block (branch and shortcut) leaves ``source``'s output in its place, which is what
    the block computed when the branch outputs zero.
    """
    source: int
    shortcut: int
    convs: tuple[int, ...]

    @property
    def layers(self) -> range:
        """The layers that removing the block deletes: the branch and the shortcut."""
        return range(self.source + 1, self.shortcut + 1)


def residual_blocks(cfg: ModelCfg) -> list[ResidualBlock]:
    """The residual blocks of a cfg that layer pruning can remove, in cfg order.

    A block qualifies when its shortcut adds one ``from`` layer with a linear activation, its branch
    reads only the source and itself, and no layer outside the block reads inside the branch.
    """
    inputs = layer_inputs(cfg)
    readers: dict[int, list[int]] = {}
    for k, srcs in enumerate(inputs):
        for j in srcs:
            readers.setdefault(j, []).append(k)
    blocks = []
    for i, b in enumerate(cfg.layers):
        if b.type != "shortcut" or len(inputs[i]) != 2 or b["activation"] != "linear":
            continue
        source = inputs[i][1]
        branch = range(source + 1, i)
        if source < 0 or not branch:
            continue
        closed_in = all(s == source or s in branch for k in branch for s in inputs[k])
        closed_out = all(r in branch or r == i for k in branch for r in readers.get(k, []))
        convs = tuple(k for k in branch if cfg.layers[k].type == "convolutional")
        if closed_in and closed_out and convs:
            blocks.append(ResidualBlock(source, i, convs))
    return blocks
