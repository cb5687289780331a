"""Which conv output channels are tied together, and where every layer's channels come from.

Every channel of every layer's output is traced back to the conv output channels it is made of, by
each layer kind's channel rule (:mod:`models.kinds`): a conv makes its own channels (OWN); pooling,
upsampling and dropout pass them through (PASS); ``[route]`` concatenates, with ``groups`` taking
slice ``group_id`` of each input (CONCAT); ``[shortcut]``, ``[scale_channels]`` and ``[sam]`` combine
channel ``c`` of their inputs into channel ``c`` (COMBINE). Conv channels that end up combined are
**tied**: a pruning method must keep or remove them together, or the add (multiply) would no longer
line up. A ``[route]`` with ``groups`` splits a tensor into equal slices, so channel ``k`` of one
slice is tied to channel ``k`` of the others: removing the same positions from every slice keeps the
split where it was.

Pruning, the choice of layers for sparse training, shared quantization scales across adds and
concats, and feature matching for distillation ask this graph; none re-derives cfg index rules.
The network input's channels are traced as conv ``IMAGE`` (-1); no add or concat can reach them
(routes and shortcuts only read layers), so they are never tied to a conv.
"""

from __future__ import annotations

from collections import defaultdict

from models.cfg import ModelCfg
from models.kinds import COMBINE, CONCAT, OWN, kind_of
from models.shapes import IMAGE, infer_shapes, layer_inputs

Channel = tuple[int, int]  # (conv layer index or IMAGE, output channel)


class UnionFind:
    """Disjoint sets of hashable, ordered items; a class's representative is its smallest member."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class ChannelGraph:
    """The channel dependencies of a cfg (built from the cfg alone, no weights).

    ``origins[i][c]``: the set of conv channels that layer ``i``'s output channel ``c`` is made of
    (one for a conv or a pass-through, several after a ``[shortcut]``).
    """

    def __init__(self, cfg: ModelCfg):
        self.cfg = cfg
        self.inputs = layer_inputs(cfg)
        infer_shapes(cfg)  # validates the cfg: the channel slicing below relies on counts that fit
        image = self._image = tuple(frozenset({(IMAGE, c)}) for c in range(cfg.net["channels"]))
        uf = UnionFind()
        origins: list[tuple[frozenset[Channel], ...]] = []
        for i, (b, srcs) in enumerate(zip(cfg.layers, self.inputs)):
            ins = [image if j == IMAGE else origins[j] for j in srcs]
            rule = kind_of(b).channels
            if rule == OWN:
                out = tuple(frozenset({(i, c)}) for c in range(b["filters"]))
            elif rule == CONCAT:
                g, gid = b["groups"], b["group_id"]
                out = ()
                for x in ins:
                    size = len(x) // g
                    for k in range(size):  # equal slices: position k of every slice is tied
                        for m in range(1, g):
                            uf.union(min(x[k]), min(x[m * size + k]))
                    out += x[gid * size:(gid + 1) * size]
            elif rule == COMBINE:
                # the output has the channels of the last input (scale_channels: the `from` layer,
                # scaled by the first input's per-channel values)
                out = tuple(frozenset().union(*(x[c] for x in ins)) for c in range(len(ins[-1])))
            else:  # PASS (a head's output is its input)
                out = ins[0]
            for chans in out:
                first = min(chans)
                for ch in chans:
                    uf.union(first, ch)
            origins.append(out)
        self.origins = origins
        self._uf = uf
        self.convs = [i for i, b in enumerate(cfg.layers) if kind_of(b).channels == OWN]
        # convs are in one chain when any of their channels are tied; (i, 0) stands for conv i here
        convs_uf = UnionFind()
        first_conv: dict[Channel, int] = {}  # channel group -> the first conv seen in it
        for i in self.convs:
            for c in range(cfg.layers[i]["filters"]):
                convs_uf.union((first_conv.setdefault(uf.find((i, c)), i), 0), (i, 0))
        members: dict[Channel, set[int]] = defaultdict(set)
        for i in self.convs:
            members[convs_uf.find((i, 0))].add(i)
        self._chain = {i: frozenset(members[convs_uf.find((i, 0))]) for i in self.convs}
        # which convs' channels each conv and each head reads (through pass-throughs, routes, adds)
        self._consumers: dict[int, list[int]] = defaultdict(list)
        for k in self.convs:
            for src in sorted({ch[0] for chans in self.input_origins(k) for ch in chans}):
                self._consumers[src].append(k)
        self._head_of: dict[int, int] = {}
        for h in cfg.heads:
            for chans in self.input_origins(h):
                for conv, _ in chans:
                    self._head_of.setdefault(conv, h)

    # ---------------------------------------------------------------- ties
    def group(self, conv: int, channel: int) -> Channel:
        """A representative of the channels tied to (conv, channel); equal for tied channels."""
        return self._uf.find((conv, channel))

    def tied_convs(self, conv: int) -> set[int]:
        """The other convs whose channels are tied to any channel of ``conv``."""
        return set(self._chain[conv] - {conv})

    def chains(self) -> list[list[int]]:
        """Sets of two or more convs tied to each other (residual chains, grouped splits), sorted."""
        return [list(c) for c in sorted({tuple(sorted(c)) for c in self._chain.values() if len(c) > 1})]

    # ---------------------------------------------------------------- what may change
    def is_tied(self, conv: int) -> bool:
        """Whether a channel of ``conv`` is tied to another channel, of another conv or of itself."""
        if self.tied_convs(conv):
            return True
        n = self.cfg.layers[conv]["filters"]
        return len({self.group(conv, c) for c in range(n)}) < n

    def fixed_reason(self, conv: int) -> str | None:
        """Why the output channels of ``conv`` (or of a conv tied to it) cannot be removed, or None."""
        for j in sorted({conv, *self.tied_convs(conv)}):
            b = self.cfg.layers[j]
            if j in self._head_of:
                return f"{b.where()}: feeds the [yolo] head at line {self.cfg.layers[self._head_of[j]].line}"
            if not b["batch_normalize"]:
                return f"{b.where()}: has no batch norm (no gamma to rank its channels by)"
            if b["groups"] > 1:
                return f"{b.where()}: a grouped conv (groups={b['groups']}) keeps its channels"
            for k in self.consumers(j):
                if self.cfg.layers[k]["groups"] > 1:
                    return (f"{b.where()}: feeds the grouped conv at line {self.cfg.layers[k].line} "
                            f"(groups={self.cfg.layers[k]['groups']}), whose input channels stay")
        return None

    def readers(self, layer: int) -> list[int]:
        """Layers that take layer ``layer``'s output as an input."""
        return [i for i, srcs in enumerate(self.inputs) if layer in srcs]

    def input_origins(self, layer: int) -> tuple[frozenset[Channel], ...]:
        """For a conv (or any single-input layer): the conv channels behind each of its input channels."""
        j = self.inputs[layer][0]
        return self._image if j == IMAGE else self.origins[j]

    def consumers(self, conv: int) -> list[int]:
        """Convs whose input channels include channels of ``conv`` (through pass-throughs, routes and
        adds): the layers whose weights change when ``conv`` loses output channels."""
        return list(self._consumers.get(conv, []))
