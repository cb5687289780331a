"""Weights in and out: darknet ``.weights``, ``.pt`` checkpoints, and ``load_model`` for both.

Darknet ``.weights`` layout: int32 major, minor, revision; ``seen`` as int64 when
major*10 + minor >= 2 (else int32); then, for every ``[convolutional]`` in cfg order, float32
biases (or, with batch_normalize, BN beta, gamma, running mean, running variance) followed by the
conv weights (filters × in/groups × size × size). Nothing else in our sections has weights.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` accepts and that carries its own
cfg text, so the checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.cfg import ModelCfg, format_value, parse_cfg, read_cfg, write_cfg
from models.darknet import Darknet
from models.shapes import head_channels, infer_shapes, layer_inputs
from utils.errors import UserError
from utils.files import read_bytes
from utils.outputs import atomic_write, save_torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "yolo-compress-checkpoint"
CHECKPOINT_VERSION = 1
# suffixes that are certainly not darknet weights (everything but .pt is read as darknet weights,
# since darknet names backbone files like yolov3-tiny.conv.15)
NOT_DARKNET = (".onnx", ".engine", ".trt", ".pth", ".pkl", ".cfg", ".yaml", ".json")
WEIGHTS_VERSION = (0, 2, 5)  # major, minor, revision written to new .weights (uint64 `seen`)


@dataclass(frozen=True)
class ConvSpec:
    """The tensors one ``[convolutional]`` layer stores in a ``.weights`` file, in file order."""
    index: int
    line: int
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (state-dict key, shape)

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensors)


def conv_specs(cfg: ModelCfg) -> list[ConvSpec]:
    """Per conv layer, the state-dict keys and shapes in darknet's file order."""
    shapes = infer_shapes(cfg)
    specs = []
    for i, (b, srcs) in enumerate(zip(cfg.layers, layer_inputs(cfg))):
        if b.type != "convolutional":
            continue
        c_in = shapes[srcs[0]].c if srcs[0] >= 0 else cfg.net["channels"]
        f, p = b["filters"], f"layers.{i}"
        weight = (f"{p}.conv.weight", (f, c_in // b["groups"], b["size"], b["size"]))
        if b["batch_normalize"]:
            head = tuple((f"{p}.bn.{n}", (f,)) for n in ("bias", "weight", "running_mean", "running_var"))
        else:
            head = ((f"{p}.conv.bias", (f,)),)
        specs.append(ConvSpec(i, b.line, (*head, weight)))
    return specs


@dataclass
class LoadReport:
    """What a weights load did: how many tensors it set and which it skipped (and why)."""
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors", *self.notes]
        if self.skipped:  # a few named, the rest counted: a warning is one readable line
            shown = "; ".join(self.skipped[:3])
            more = f" and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            lines.append(f"skipped {len(self.skipped)}: {shown}{more}")
        return "; ".join(lines)


@dataclass(frozen=True)
class DarknetFile:
    """A ``.weights`` file: its path, header version, ``seen`` and the float32 values after the header."""
    path: Path
    version: tuple[int, int, int]
    seen: int
    data: np.ndarray


def read_darknet_file(path: str | Path) -> DarknetFile:
    path = Path(path)
    raw = read_bytes(path, "weights")
    too_short = UserError(f"{path}: {len(raw)} bytes is too short for a darknet .weights header")
    if len(raw) < 12:
        raise too_short
    major, minor, revision = (int(v) for v in np.frombuffer(raw, "<i4", 3))
    wide = major * 10 + minor >= 2
    offset = 12 + (8 if wide else 4)  # `seen` is uint64 from version 0.2 on, uint32 before
    if len(raw) < offset:
        raise too_short
    if major > 1000 or minor > 1000:
        raise UserError(f"{path}: transposed darknet weights (version {major}.{minor}) are not "
                        f"supported")
    seen = int(np.frombuffer(raw, "<u8" if wide else "<u4", 1, 12)[0])
    body = len(raw) - offset
    if body % 4:
        raise UserError(f"{path}: {body} bytes after the header is not a whole number of float32 "
                        f"values; the file is damaged")
    return DarknetFile(path, (major, minor, revision), seen, np.frombuffer(raw, "<f4", offset=offset))


def _prefix(specs: list[ConvSpec], cutoff: int | None) -> list[ConvSpec]:
    return specs if cutoff is None else [s for s in specs if s.index < cutoff]


def _fits(cfg: ModelCfg, n_floats: int, cutoff: int | None) -> bool:
    """Whether a file of ``n_floats`` values can be read as ``cfg``'s weights below ``cutoff``.

    Exactly the whole cfg always fits. With a cutoff, exactly the layers below it fit too, and so
    does any longer file when no head conv lies below the cutoff: a backbone prefix is the same
    whatever the class count (darknet's partial load). Past a head conv, a longer file could be one
    for another class count, whose later layers would be read shifted, so it does not fit.
    """
    specs = conv_specs(cfg)
    need = sum(s.size for s in _prefix(specs, cutoff))
    if n_floats == sum(s.size for s in specs) or n_floats == need:
        return True
    head_convs = {i - 1 for i in cfg.heads}
    return (cutoff is not None and n_floats > need
            and not any(s.index in head_convs for s in _prefix(specs, cutoff)))


def read_darknet_state(cfg: ModelCfg, file: DarknetFile, cutoff: int | None = None
                       ) -> dict[str, torch.Tensor]:
    """The state-dict entries of every conv of ``cfg`` below ``cutoff``, read from ``file``.

    A file whose length does not fit (see ``_fits``) is a UserError with the counts that disagree.
    """
    specs = _prefix(conv_specs(cfg), cutoff)
    if not _fits(cfg, len(file.data), cutoff):
        need = sum(s.size for s in specs)
        raise UserError(_length_message(file.path, cfg, specs, len(file.data), need, cutoff))
    state, pos = {}, 0
    for spec in specs:
        for key, shape in spec.tensors:
            n = int(np.prod(shape))
            state[key] = torch.from_numpy(file.data[pos:pos + n].reshape(shape).copy())
            pos += n
    return state


def _length_message(path: Path, cfg: ModelCfg, specs: list[ConvSpec], have: int, need: int,
                    cutoff: int | None) -> str:
    where = f" (layers below cutoff {cutoff})" if cutoff is not None else ""
    msg = f"{path}: the cfg {cfg.source}{where} needs {need} weights after the header, the file has {have}"
    if have > need and cutoff is None:
        return msg + ": the weights belong to a different cfg (or pass a cutoff to load only a prefix)"
    if have > need:
        return msg + (": below the cutoff lies a head conv, so the file must hold exactly those "
                      "layers or the whole cfg (for any class count)")
    pos, last = 0, -1
    for spec in specs:
        if pos == have and last >= 0:
            return (msg + f": the file holds exactly layers 0..{last}; to load a backbone-only "
                    f"file like this, pass cutoff={last + 1} (--cutoff {last + 1})")
        last = spec.index
        if pos + spec.size > have:
            return msg + (f": it ends inside layer {spec.index} ({cfg.source}:{spec.line}); "
                          f"the file is truncated or belongs to a different cfg")
        pos += spec.size
    return msg


def fit_head_conv(cfg: ModelCfg, head_index: int, what: str) -> None:
    """After a head's classes or masks changed, resize the conv feeding it (in place)."""
    head, feeder = cfg.layers[head_index], cfg.layers[head_index - 1]
    if feeder.type != "convolutional":
        raise UserError(f"{head.where()}: cannot change the {what}: the layer before this head is a "
                        f"[{feeder.type}], not a [convolutional]")
    feeder.set("filters", head_channels(head))


def with_classes(cfg: ModelCfg, classes: int) -> ModelCfg:
    """A copy of ``cfg`` whose heads predict ``classes`` classes, head convs resized to match."""
    out = cfg.copy()
    for i in out.heads:
        out.layers[i].set("classes", classes)
        fit_head_conv(out, i, "class count")
    return out


def _source_classes(cfg: ModelCfg, n_floats: int) -> int | None:
    """The class count whose head sizes make ``cfg`` need exactly ``n_floats`` weights, if any."""
    def total(c: int) -> int:
        return sum(s.size for s in conv_specs(with_classes(cfg, c)))
    base, per_class = total(1), total(2) - total(1)
    if per_class <= 0 or (n_floats - base) % per_class:
        return None
    classes = 1 + (n_floats - base) // per_class
    return classes if classes >= 1 else None


def transfer_state(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> None:
    """Copy every tensor of ``state`` whose key and shape match ``model``; note the others."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            report.skipped.append(f"{key} (not in the model)")
        elif own[key].shape != value.shape:
            report.skipped.append(f"{key} (shape {tuple(value.shape)} in the weights, "
                                  f"{tuple(own[key].shape)} in the model)")
        else:
            with torch.no_grad():
                own[key].copy_(value)
            report.loaded += 1


def load_darknet_weights(model: Darknet, path: str | Path, cutoff: int | None = None) -> LoadReport:
    """Load darknet ``.weights`` into ``model`` (only layers below ``cutoff``, if given).

    If the file's length fits the same cfg with another class count (a COCO file into a 3-class
    model, say), the heads whose shapes differ are skipped and listed in the report.
    """
    if model.fused:
        raise UserError("cannot load darknet weights into a fused model; load first, then fuse()")
    if cutoff is not None and cutoff < 1:
        raise UserError(f"cutoff={cutoff}: must be at least 1 (the number of layers to load)")
    file = read_darknet_file(path)
    source = model.cfg
    if not _fits(source, len(file.data), cutoff):
        # a cfg whose heads cannot be resized keeps the length-mismatch error
        with contextlib.suppress(UserError):
            classes = _source_classes(model.cfg, len(file.data))
            if classes is not None and classes != model.cfg.classes:
                source = with_classes(model.cfg, classes)
    report = LoadReport()
    state = read_darknet_state(source, file, cutoff)
    if source is not model.cfg:
        report.notes.append(f"the weights are for {source.classes} classes, the model has "
                            f"{model.cfg.classes}: head layers keep their initial weights")
    transfer_state(model, state, report)
    model.seen = file.seen
    return report


def save_darknet_weights(model: Darknet, path: str | Path, cutoff: int | None = None,
                         seen: int | None = None) -> None:
    """Write ``model`` (layers below ``cutoff``, all by default) as darknet ``.weights``."""
    if model.fused:
        raise UserError("cannot write darknet weights from a fused model: batch norms are folded")
    state = model.state_dict()
    specs = _prefix(conv_specs(model.cfg), cutoff)
    header = np.array(WEIGHTS_VERSION, "<i4").tobytes()
    header += np.array([model.seen if seen is None else seen], "<u8").tobytes()
    chunks = [state[key].detach().float().cpu().numpy().astype("<f4").ravel()
              for spec in specs for key, _ in spec.tensors]
    atomic_write(path, lambda f: (f.write(header), *(f.write(c.tobytes()) for c in chunks)))


def save_checkpoint(path: str | Path, model: Darknet, **meta: Any) -> None:
    """Write ``{format, version, cfg text, model state, meta}`` atomically; ``meta`` must be plain
    (tensors, numbers, strings, lists, dicts) so that ``weights_only`` loading accepts it."""
    if model.fused:
        raise UserError("save the model before fuse(): a checkpoint keeps batch norms unfolded")
    if model.quant_config is not None:
        meta = {**meta, "quant": model.quant_config.to_dict()}
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "cfg": write_cfg(model.cfg),
            "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, "meta": meta}
    save_torch(ckpt, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (``weights_only``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # what a pickled class or function gives
            raise UserError(f"{path}: not a readable checkpoint (damaged, or not a PyTorch file)") from None
        # PyTorch's message goes on to advise loading it unsafely; the user gets the fact instead
        raise UserError(f"{path}: refused: it holds Python objects beyond tensors and plain data, which "
                        f"could run code when loaded; only checkpoints this project writes are read"
                        ) from None
    except Exception as e:  # torch raises several types for damaged or foreign files
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' format "
                        f"tag); darknet weights end in .weights and need --cfg")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt['version']} is newer than this code "
                        f"reads ({CHECKPOINT_VERSION})")
    if not isinstance(ckpt.get("cfg"), str) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: damaged checkpoint: it lacks the cfg text or the model state")
    return ckpt


def cfg_differences(have: ModelCfg, want: ModelCfg, same_classes: bool = False) -> list[str]:
    """Where the layers of ``want`` mean something other than those of ``have`` (``[net]`` aside),
    one phrase per layer; ``same_classes``: a different class count (and the head convs sized by it)
    is not a difference."""
    if same_classes and have.heads and want.heads:
        have = with_classes(have, want.classes)
    if len(have.layers) != len(want.layers):
        return [f"{len(have.layers)} layers in the .pt, {len(want.layers)} in the cfg"]
    out = []
    for i, (a, b) in enumerate(zip(have.layers, want.layers)):
        if a.type != b.type:
            out.append(f"layer {i} is [{a.type}] in the .pt, [{b.type}] in the cfg")
            continue
        keys = [k for k in dict.fromkeys([*a.options, *b.options]) if a[k] != b[k]]
        if keys:
            out.append(f"layer {i} [{a.type}] " + ", ".join(
                f"{k}={format_value(a[k])} in the .pt, {format_value(b[k])} in the cfg" for k in keys))
    return out


def check_cfg_matches(weights: Path, embedded: ModelCfg, cfg: ModelCfg, flag: str, transfer: bool) -> None:
    """Refuse a ``--cfg`` that describes another network than the ``.pt`` it is given with (a model
    built from it would be loaded in part and run half random); ``transfer`` (training's initial
    weights) allows another class count, whose heads then start anew."""
    diffs = cfg_differences(embedded, cfg, same_classes=transfer)
    if diffs:
        more = f" (and {len(diffs) - 2} more layers)" if len(diffs) > 2 else ""
        raise UserError(f"{flag} {cfg.source} is not the network inside {weights}: "
                        f"{'; '.join(diffs[:2])}{more}; a .pt carries its cfg: leave out {flag}")


def load_model(weights: str | Path | None = None, cfg: str | Path | ModelCfg | None = None,
               device: str | torch.device = "cpu", cutoff: int | None = None, transfer: bool = False,
               cfg_flag: str = "--cfg") -> Darknet:
    """The one entry for every script: a ``.pt`` checkpoint alone, cfg + darknet weights (any
    other file name, since darknet's own are ``.weights`` or ``.conv.74``), or a cfg alone
    (random initial weights).

    With a ``.pt`` and a cfg, the cfg must describe the checkpoint's network (``cfg_flag`` names it in
    the error); ``transfer`` (initial weights for training) allows another class count: the head
    tensors whose shapes differ are skipped and logged.
    """
    if weights is None and cfg is None:
        raise UserError("give --weights (a .pt checkpoint, or darknet .weights with --cfg) or --cfg")
    weights = Path(weights) if weights is not None else None
    ckpt = None
    if weights is not None and weights.suffix == ".pt":
        ckpt = load_checkpoint(weights)
        model_cfg = parse_cfg(ckpt["cfg"], f"{weights} (embedded cfg)")
    elif weights is not None and weights.suffix in NOT_DARKNET:
        raise UserError(f"{weights}: {weights.suffix} files are not model weights this script "
                        f"reads; give a .pt checkpoint or darknet weights with --cfg")
    elif cfg is None:
        raise UserError(f"{weights}: darknet .weights carry no architecture: give its --cfg")
    if cfg is not None:
        given = cfg if isinstance(cfg, ModelCfg) else read_cfg(cfg)
        if ckpt is not None:
            check_cfg_matches(weights, model_cfg, given, cfg_flag, transfer)
        model_cfg = given
    model = Darknet(model_cfg)
    if ckpt is not None and ckpt["meta"].get("quant"):  # a quantized checkpoint: the same modules first
        from models.quantized.convert import QuantConfig, quantize_model

        quantize_model(model, QuantConfig.from_dict(ckpt["meta"]["quant"]))
    if ckpt is not None:
        report = LoadReport()
        transfer_state(model, ckpt["model"], report)
        missing = set(model.state_dict()) - set(ckpt["model"])
        report.skipped += [f"{k} (not in the checkpoint)" for k in sorted(missing)]
    elif weights is not None:
        report = load_darknet_weights(model, weights, cutoff)
    else:
        report = None
    if report is not None and (report.skipped or report.notes):
        log.warning("%s: %s", weights, report)
    return model.to(device)


@dataclass
class Opened:
    """A model opened for a script: the model, its checkpoint's meta (empty for darknet weights), the
    class names and training size it carries (None when it carries none)."""
    model: Darknet
    meta: dict[str, Any]
    names: list[str] | None
    img_size: int | None
    path: Path


def open_checkpoint(weights: str | Path, cfg: str | Path | ModelCfg | None = None,
                    device: str | torch.device = "cpu", flag: str = "--weights") -> Opened:
    """The one way scripts open ``--weights`` (a ``.pt`` alone, or darknet weights with ``--cfg``)."""
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    meta = load_checkpoint(path)["meta"] if path.suffix == ".pt" else {}
    model = load_model(path, cfg, device)
    size = meta.get("img_size")
    return Opened(model, meta, meta.get("names") or None, int(size) if size else None, path)


def resolve_img_size(flag: int | None, trained: int | None, model: Darknet) -> int:
    """The image size a script uses, by one precedence for every script: ``--img-size``, else the size
    the checkpoint was trained (or last evaluated) at, else the cfg's ``[net]`` height; it must be a
    multiple of the model's largest stride."""
    size = flag or trained or int(model.cfg.net["height"])
    if size % model.max_stride:
        where = "--img-size" if flag else "the checkpoint's size" if trained else f"{model.cfg.source} height"
        raise UserError(f"{where} {size}: must be a multiple of {model.max_stride}, the model's largest "
                        f"stride")
    return size
