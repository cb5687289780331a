"""The pruning engine: channel masks or residual blocks in, a physically smaller ``Darknet`` out.

Every method (``prune/*_prune.py``) only decides *what* to remove (:mod:`prune.policies`); this module
does the rest once:

- :func:`prune_channels` checks the masks against the channel graph (fixed convs stay whole, tied
  channels go together, no conv loses every channel), slices each conv's output rows and the matching
  input columns of every consumer, and writes the new ``filters=`` into a copy of the cfg;
- :func:`remove_blocks` deletes whole residual blocks (branch and ``[shortcut]``) and renumbers every
  ``[route] layers=``, ``[shortcut] from=`` and ``[scale_channels]/[sam] from=`` after them;
- both **compensate**: a removed conv channel whose γ is small still emits the constant act(β)
  (act(bias) without batch norm), and a removed branch adds the constant act(β) of its last conv.
  :func:`missing_signal` carries these constants through pass-through layers, routes, shortcuts and
  upsampling to the next convs, where they are folded in: ``Δ_o = Σ_c m_c Σ_k W[o, c, k]`` is
  subtracted from the next batch norm's running mean, or added to the conv's bias without one.

The fold is exact where a conv sees no zero padding (1x1 convs, and the interior of 3x3 maps); at
image borders a 3x3 conv pads with zeros, not with the constant, and a BN re-calibration
(``utils.torch_utils.recalibrate_bn``, ``--recalibrate`` in the scripts) absorbs the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from models.cfg import ModelCfg
from models.darknet import Darknet
from models.graph import ChannelGraph
from models.kinds import COMBINE, CONCAT, OWN, kind_of
from models.layers import activation
from models.shapes import IMAGE, layer_inputs
from prune.blocks import ResidualBlock
from utils.errors import UserError

Masks = dict[int, torch.Tensor]  # conv layer index -> bool tensor over its output channels (True: keep)


# ---------------------------------------------------------------- constants that removed parts leave
def removed_output(model: Darknet, conv: int) -> torch.Tensor:
    """The constant each output channel of ``conv`` tends to as its γ goes to 0: act(β), or act(bias)."""
    layer = model.layers[conv]
    bn = layer.bn
    if isinstance(bn, torch.nn.BatchNorm2d):
        pre = bn.bias.detach().double()
    else:
        pre = layer.conv.bias.detach().double()
    return layer.act(pre.view(1, -1, 1, 1)).flatten()


def missing_signal(cfg: ModelCfg, conv_missing: dict[int, torch.Tensor],
                   conv_gone: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """For every layer, per output channel (original numbering), the constant the pruned model lacks.

    ``conv_missing[i]`` is what conv ``i``'s own output lacks (act(β) of removed channels, zero for
    kept ones) and ``conv_gone[i]`` which of its channels are removed as a whole; convs not listed
    lack nothing, since their consumers' folds restore them. Adds, concatenations, upsampling and
    pooling carry the constants exactly. A shortcut with a non-linear activation, ``[scale_channels]``
    and ``[sam]`` are exact for channels removed as a whole (their output is the operation applied
    to the constants); a kept channel that lacks only an offset passes them with nothing missing,
    an approximation that BN re-calibration corrects.
    """
    inputs = layer_inputs(cfg)
    n_image = cfg.net["channels"]
    image = (torch.zeros(n_image, dtype=torch.float64), torch.zeros(n_image, dtype=torch.bool))
    out: list[tuple[torch.Tensor, torch.Tensor]] = []  # (missing constant, removed as a whole)
    for i, (b, srcs) in enumerate(zip(cfg.layers, inputs)):
        ins = [image if j == IMAGE else out[j] for j in srcs]
        kind = kind_of(b)
        if kind.channels == OWN:
            none = torch.zeros(b["filters"], dtype=torch.float64)
            m = conv_missing.get(i, none)
            gone = conv_gone.get(i, none.bool())
        elif kind.channels == CONCAT:
            g, gid = b["groups"], b["group_id"]
            m = torch.cat([x.chunk(g)[gid] for x, _ in ins])
            gone = torch.cat([x.chunk(g)[gid] for _, x in ins])
        elif kind.channels == COMBINE:
            gone = torch.stack([x for _, x in ins]).all(0)
            add = kind.combine == "add"
            m = ins[0][0]
            for x, _ in ins[1:]:
                m = m + x if add else m * x
            if not add or b["activation"] != "linear":
                m = torch.where(gone, _act(b["activation"], m), 0.0)
        else:  # PASS: pooling, dropout, heads carry a constant unchanged; upsampling scales it
            m, gone = ins[0]
            if kind.constant_scale:
                m = m * b[kind.constant_scale]
        out.append((m, gone))
    return [m for m, _ in out]


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    return activation(name)(x.view(1, -1, 1, 1)).flatten()


@torch.no_grad()
def fold_missing(model: Darknet, missing: list[torch.Tensor], convs: Iterable[int]) -> None:
    """Fold the constant missing from each conv's input into its BN running mean (or its bias)."""
    for k in convs:
        j = model.inputs[k][0]
        if j == IMAGE:
            continue
        m = missing[j]
        if not torch.any(m != 0):
            continue
        layer = model.layers[k]
        w = layer.conv.weight.detach().double()
        kh, kw = w.shape[-2:]
        patch = m.view(1, -1, 1, 1).expand(1, m.numel(), kh, kw)
        delta = F.conv2d(patch, w, groups=layer.conv.groups).flatten()  # Σ_c m_c Σ_k W[o, c, k]
        if isinstance(layer.bn, torch.nn.BatchNorm2d):
            layer.bn.running_mean.sub_(delta.to(layer.bn.running_mean))
        else:
            layer.conv.bias.add_(delta.to(layer.conv.bias))


# ---------------------------------------------------------------- channel pruning
def check_masks(graph: ChannelGraph, masks: Masks) -> None:
    """Raise UserError for a mask that would break the network; every method's masks pass through here."""
    cfg = graph.cfg
    for i, mask in masks.items():
        if i not in graph.convs:
            raise UserError(f"layer {i} is not a [convolutional] layer; only conv outputs are pruned")
        b = cfg.layers[i]
        if mask.dtype != torch.bool or mask.shape != (b["filters"],):
            raise UserError(f"{b.where()}: the mask must be {b['filters']} booleans, got "
                            f"{tuple(mask.shape)} {mask.dtype}")
        if not mask.any():
            raise UserError(f"{b.where()}: the mask removes all {b['filters']} channels; every layer "
                            f"keeps at least one (lower --percent)")
        reason = graph.fixed_reason(i)
        if reason and not mask.all():
            raise UserError(f"{reason}; its channels cannot be removed")
    decision: dict[tuple[int, int], tuple[bool, int, int]] = {}
    for i in graph.convs:
        mask = masks.get(i)
        for c in range(cfg.layers[i]["filters"]):
            keep = True if mask is None else bool(mask[c])
            rep = graph.group(i, c)
            seen = decision.setdefault(rep, (keep, i, c))
            if seen[0] != keep:
                raise UserError(f"{cfg.layers[i].where()}: channel {c} is tied to channel {seen[2]} of "
                                f"{cfg.layers[seen[1]].where()} (a shortcut, or a grouped route) but the "
                                f"masks keep one and remove the other")


def kept_channels(graph: ChannelGraph, masks: Masks) -> list[torch.Tensor]:
    """For every layer, the indices of its output channels that remain."""
    def kept(ch: tuple[int, int]) -> bool:
        conv, c = ch
        return conv == IMAGE or conv not in masks or bool(masks[conv][c])

    return [torch.tensor([k for k, chans in enumerate(origin) if kept(min(chans))], dtype=torch.long)
            for origin in graph.origins]


@torch.no_grad()
def prune_channels(model: Darknet, masks: Masks, compensate: bool = True) -> Darknet:
    """A new, smaller model without the output channels that ``masks`` remove (``model`` is untouched)."""
    graph = ChannelGraph(model.cfg)
    masks = {i: m.cpu() for i, m in masks.items() if not m.all()}
    check_masks(graph, masks)
    work = _copy(model)
    if compensate:
        conv_missing = {i: torch.where(m, 0.0, removed_output(work, i)) for i, m in masks.items()}
        conv_gone = {i: ~m for i, m in masks.items()}
        fold_missing(work, missing_signal(work.cfg, conv_missing, conv_gone), graph.convs)
    keep = kept_channels(graph, masks)
    cfg = work.cfg.copy()
    state = work.state_dict()
    for i in graph.convs:
        cfg.layers[i].set("filters", len(keep[i]))
        j = graph.inputs[i][0]
        rows = keep[i]
        prefix = f"layers.{i}."
        w = state[prefix + "conv.weight"][rows]
        if work.layers[i].conv.groups == 1 and j != IMAGE:
            w = w[:, keep[j]]
        state[prefix + "conv.weight"] = w
        for name in ("conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
            if prefix + name in state:
                state[prefix + name] = state[prefix + name][rows]
    return _rebuilt(model, cfg, state)


# ---------------------------------------------------------------- layer pruning
@torch.no_grad()
def remove_blocks(model: Darknet, blocks: list[ResidualBlock], compensate: bool = True) -> Darknet:
    """A new model without the residual ``blocks`` (branch and shortcut); later references renumbered."""
    if not blocks:
        return _copy(model)
    removed: set[int] = set()
    for blk in blocks:
        overlap = removed & set(blk.layers)
        if overlap:
            raise UserError(f"residual blocks overlap at layers {sorted(overlap)}")
        removed |= set(blk.layers)
    work = _copy(model)
    cfg_old = work.cfg
    if compensate:
        conv_missing = {c: removed_output(work, c) for blk in blocks for c in blk.convs}
        conv_gone = {c: torch.ones_like(v, dtype=torch.bool) for c, v in conv_missing.items()}
        kept_convs = [i for i, b in enumerate(cfg_old.layers)
                      if kind_of(b).channels == OWN and i not in removed]
        fold_missing(work, missing_signal(cfg_old, conv_missing, conv_gone), kept_convs)
    new_index: dict[int, int] = {}
    by_shortcut = {blk.shortcut: blk for blk in blocks}
    n = 0
    for i in range(len(cfg_old.layers)):
        if i in by_shortcut:  # the block's output is now its source's output
            new_index[i] = new_index[by_shortcut[i].source]
        elif i not in removed:
            new_index[i] = n
            n += 1
    inputs = layer_inputs(cfg_old)
    layers = []
    for i, b in enumerate(cfg_old.layers):
        if i in removed:
            continue
        b = b.copy()
        k = new_index[i]
        kind = kind_of(b)
        srcs = list(inputs[i][1:] if kind.reads_previous else inputs[i])  # what the reference keys name
        for key in kind.references:
            refs = b[key] if isinstance(b[key], list) else [b[key]]
            named, srcs = srcs[:len(refs)], srcs[len(refs):]
            new = [new_index[j] - k if r < 0 else new_index[j] for r, j in zip(refs, named)]
            b.set(key, new if isinstance(b[key], list) else new[0])
        layers.append(b)
    cfg = ModelCfg(cfg_old.net.copy(), layers, cfg_old.source)
    state = {}
    for key, v in work.state_dict().items():
        _, idx, rest = key.split(".", 2)
        if int(idx) in removed:
            continue
        state[f"layers.{new_index[int(idx)]}.{rest}"] = v
    return _rebuilt(model, cfg, state)


# ---------------------------------------------------------------- helpers
def _copy(model: Darknet) -> Darknet:
    return _rebuilt(model, model.cfg, {k: v.cpu() for k, v in model.state_dict().items()})


def _rebuilt(model: Darknet, cfg: ModelCfg, state: dict[str, torch.Tensor]) -> Darknet:
    out = Darknet(cfg)
    out.load_state_dict(state)
    out.seen = model.seen
    return out.eval()
