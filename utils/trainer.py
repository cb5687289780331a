"""The one training loop. Sparsity, distillation and quantization-aware training plug in as hooks.

``Trainer(opts, hooks).fit()`` trains a darknet-cfg model; ``train.py`` only parses flags into
:class:`TrainOptions`. A :class:`TrainHook` can

- ``prepare_model``: swap modules (QAT) before the optimizer and EMA exist;
- ``on_epoch_start``: freeze BN statistics or observers on a schedule;
- ``extra_losses``: add loss terms (distillation) given the batch, predictions and the detection loss
  with its matched positions;
- ``after_backward``: touch gradients once per optimizer step, after AMP unscaling and before the
  step (the BN-L1 regulariser);
- ``on_epoch_end``: see the epoch's metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from models.cfg import parse_cfg, read_cfg
from models.darknet import Darknet
from models.io import load_checkpoint, load_model, save_checkpoint, with_classes
from utils.datasets import DataConfig, create_dataloader, read_data_file, set_epoch
from utils.errors import UserError
from utils.evaluate import EvalResult, evaluate
from utils.files import new_run_dir, read_text
from utils.loss import LossOutput, YoloLoss
from utils.outputs import OutputPlan, atomic_write
from utils.torch_utils import ModelEMA, select_device, unwrap

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HYP = REPO / "data" / "hyp.scratch.yaml"
DEFAULT_CFG = "cfg/yolo-small.cfg"
OUTPUT_FILES = ("results.csv", "opt.yaml", "hyp.yaml")  # beside weights/ and results.png
RESULT_COLUMNS = ["epoch", "train/box", "train/obj", "train/cls", "metrics/precision", "metrics/recall",
                  "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box", "val/obj", "val/cls", "lr",
                  "time_s"]


def default_workers() -> int:
    """Loader processes: none on a machine with 2 cores or fewer, where worker processes compete with
    PyTorch's threads (a training step at 224 took 693 ms with 0 workers, 741 with 1, 759 with 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


@dataclass
class TrainOptions:
    cfg: str = ""  # empty: the cfg inside a .pt --weights (e.g. a pruned model), else DEFAULT_CFG
    data: str = ""  # empty: the built-in shapes benchmark, generated on first use
    weights: str = ""  # .pt checkpoint or darknet weights to start from
    epochs: int = 16  # the default command fits in 20 minutes on 2 CPU cores
    batch_size: int = 16
    img_size: list[int] = field(default_factory=lambda: [224])  # train [min max] test, as ultralytics
    multi_scale: bool = False
    rect: bool = False  # rectangular training batches (no mosaic)
    resume: str = ""  # a last.pt to continue
    nosave: bool = False  # only the final checkpoint
    notest: bool = False  # only the final evaluation
    name: str = "exp"
    project: str = "runs/train"
    exist_ok: bool = False
    device: str = ""
    adam: bool = True  # Adam at lr0 / 10; --no-adam for SGD (see README for why Adam is the default)
    ema: bool = True
    amp: bool = False
    workers: int = field(default_factory=default_workers)
    seed: int = 0
    hyp: str = ""  # YAML overriding data/hyp.scratch.yaml
    cache_images: bool = False
    # BN-L1 sparse training (prune/sparsity.py): off unless sr
    sr: bool = False
    s: float = 0.001
    prune: int = 0  # 0 normal/regular, 1 shortcut/slim, 2 layer: which batch norms are penalized
    sr_schedule: str = "constant"  # constant, global or local decay
    sr_decay_at: float = 0.5  # fraction of the epochs after which global/local decay starts
    sr_keep: float = 0.15  # local decay: share of largest-|gamma| channels that get s * 0.01
    # knowledge distillation (distill/hook.py): off unless kd_str
    kd_str: int = 0  # strategy 1..5
    t_weights: str = ""  # teacher: a .pt, or darknet weights with t_cfg
    t_cfg: str = ""
    kd_t: float = 3.0  # temperature of the class softmax
    kd_feat_t: float = 1.0  # temperature of the spatial attention softmax (strategies 4, 5)
    kd_cls: float = 1.0  # term weights, relative to the detection loss's gains (kd_feat absolute)
    kd_obj: float = 1.0
    kd_box: float = 1.0
    kd_feat: float = 1.0
    kd_margin: float = 0.0  # strategy 2: margin m of the teacher bound
    # quantization-aware training (quant/hook.py): off unless quantized
    quantized: str = ""  # 1 / google, 2 / dorefa
    w_bit: int = 8
    a_bit: int = 8
    bn_fold: bool = False  # Jacob et al. batch-norm folding (google)
    fpga: bool = False  # power-of-two scales, everything quantized
    a_symmetric: bool = False  # google: signed int8 activations, zero point 0 (TensorRT) instead of affine
    dorefa_range: float = 8.0  # DoReFa activations clamped to [-r, r]
    freeze_bn_epoch: int = -1  # epoch from which folded BNs use running statistics (-1: never)
    freeze_observer_epoch: int = -1  # epoch from which activation ranges stop moving (-1: never)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(min train, max train, test) image sizes from the one-to-three ``--img-size`` values."""
        s = list(self.img_size)
        if not 1 <= len(s) <= 3:
            raise UserError(f"--img-size takes 1 to 3 values (min max test), got {len(s)}")
        s += [s[-1]] * (3 - len(s))
        return s[0], s[1], s[2]


class TrainHook:
    """Base class: override what you need. ``trainer`` gives access to model, optimizer, epoch, etc."""

    def prepare_model(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        return model

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        pass

    def extra_losses(self, trainer: Trainer, imgs: torch.Tensor, targets: torch.Tensor,
                     preds: list[torch.Tensor], loss: LossOutput) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, trainer: Trainer) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, epoch: int, result: EvalResult | None) -> None:
        pass


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint: ``<run>/weights/last.pt`` -> ``<run>``; a checkpoint outside a
    ``weights`` folder is its own run folder."""
    folder = Path(checkpoint).resolve().parent
    return folder.parent if folder.name == "weights" else folder


def in_repo(path: str | Path) -> Path:
    """A relative path that is missing here but exists in the repository (the shipped cfgs) goes there."""
    p = Path(path)
    return REPO / p if not p.is_absolute() and not p.exists() and (REPO / p).exists() else p


def load_hyp(path: str | Path = "") -> dict[str, Any]:
    """The default hyperparameters, overridden by the keys of a user YAML (unknown keys are an error)."""
    hyp = yaml.safe_load(DEFAULT_HYP.read_text())
    if path:
        p = Path(path)
        try:
            user = yaml.safe_load(read_text(p, "--hyp")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--hyp {p}: not valid YAML ({e})".replace("\n", " ")) from None
        if not isinstance(user, dict):
            raise UserError(f"--hyp {p}: expected a mapping of hyperparameter: value")
        unknown = sorted(set(user) - set(hyp))
        if unknown:
            raise UserError(f"--hyp {p}: unknown keys {unknown}; known keys are in {DEFAULT_HYP}")
        hyp.update(user)
    return hyp


def resolve_data(data: str) -> Path:
    """``--data``: a .data file, or empty for the built-in benchmark (generated on first use)."""
    if data:
        return Path(data)
    from utils.synthetic import ensure_shapes

    return ensure_shapes()


def init_head_biases(model: Darknet, img_size: int) -> None:
    """Start objectness near the prior of a few objects per image and classes near uniform."""
    for i in model.heads:
        head, conv = model.layers[i], model.layers[i - 1].conv
        if conv.bias is None:
            continue
        stride = model.strides(img_size)[model.heads.index(i)]
        b = conv.bias.detach().view(head.na, -1)
        b[:, 4] = math.log(8 / (img_size / stride) ** 2)
        b[:, 5:] = math.log(0.6 / (head.classes - 0.99)) if head.classes > 1 else 0.0
        conv.bias.data = b.view(-1)


def cosine(epoch: float, epochs: int, lrf: float) -> float:
    """Learning-rate factor: 1 at the start, ``lrf`` at the end."""
    return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1


class Trainer:
    def __init__(self, opts: TrainOptions, hooks: list[TrainHook] | None = None):
        self.hooks = list(hooks or [])
        self.rank = int(os.environ.get("RANK", -1))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.main = self.rank in (-1, 0)
        self.resume_ckpt = None
        if opts.resume:
            self.resume_ckpt, opts = self._resume_options(opts.resume)
        self.opts = opts
        if opts.sr:  # built from the resolved options, so a resumed run keeps its sparsity settings
            from prune.sparsity import SparsityHook

            self.hooks.insert(0, SparsityHook(opts.s, opts.prune, opts.sr_schedule, opts.sr_decay_at,
                                              opts.sr_keep))
        if opts.quantized:
            from quant.hook import hook_from_options

            self.hooks.append(hook_from_options(opts))
        if opts.kd_str or opts.t_weights:
            self.hooks.append(self._distill_hook(opts))
        self.writer = None  # TensorBoard, while fit() runs (hooks may log to it)
        if self.resume_ckpt:  # a checkpoint older than a hyperparameter key takes that key's default
            self.hyp = {**load_hyp(), **self.resume_ckpt["meta"]["hyp"]}
        else:
            self.hyp = load_hyp(opts.hyp)
        self.lr0 = self.hyp["lr0"] / 10 if opts.adam else self.hyp["lr0"]  # Adam steps are larger

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _resume_options(path: str) -> tuple[dict, TrainOptions]:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--resume {p}: checkpoint not found")
        ckpt = load_checkpoint(p)
        meta = ckpt["meta"]
        if "opts" not in meta or "train_state" not in meta:
            raise UserError(f"--resume {p}: not a train.py last.pt (no optimizer state); start a new run "
                            f"with --weights {p} instead")
        # the run continues in the folder that holds the checkpoint (runs/train/<name>/weights/last.pt),
        # wherever the run was when it started: a moved or renamed run never writes into another one
        run_dir = run_dir_of(p)
        opts = TrainOptions(**{**meta["opts"], "resume": str(p), "exist_ok": True,
                               "project": str(run_dir.parent), "name": run_dir.name})
        if meta["epoch"] + 1 >= opts.epochs:
            raise UserError(f"--resume {p}: the run already finished its {opts.epochs} epochs; start a new "
                            f"run with --weights {p} to train further")
        return ckpt, opts

    @staticmethod
    def _distill_hook(opts: TrainOptions) -> TrainHook:
        from distill.hook import DistillHook, DistillOptions

        if not opts.kd_str:
            raise UserError(f"--t_weights {opts.t_weights}: choose a distillation strategy with --KDstr 1..5")
        return DistillHook(DistillOptions(
            opts.kd_str, opts.t_weights, opts.t_cfg, opts.kd_t, opts.kd_feat_t, opts.kd_cls, opts.kd_obj,
            opts.kd_box, opts.kd_feat, opts.kd_margin))

    def setup(self) -> None:
        opts, hyp = self.opts, self.hyp
        self.min_size, self.max_size, self.test_size = opts.sizes
        if self.world_size > 1:
            import torch.distributed as dist

            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if opts.device not in ("", "cpu"):
                torch.cuda.set_device(local_rank)
                self.device = torch.device("cuda", local_rank)
            else:
                self.device = torch.device("cpu")
            self.owns_process_group = not dist.is_initialized()  # compress.py may have started it
            if self.owns_process_group:
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if opts.batch_size % self.world_size:
                raise UserError(f"--batch-size {opts.batch_size} must be a multiple of the "
                                f"{self.world_size} processes")
        else:
            self.device = select_device(opts.device)
        torch.manual_seed(opts.seed)
        np.random.seed(opts.seed)
        self.data_file = resolve_data(opts.data)
        self.data: DataConfig = read_data_file(self.data_file)
        self.model = self._build_model()
        stride = self.model.max_stride
        for s in (self.min_size, self.max_size, self.test_size):
            if s % stride:
                raise UserError(f"--img-size {s}: must be a multiple of the model's largest stride {stride}")
        if not opts.weights and not self.resume_ckpt:
            init_head_biases(self.model, self.max_size)
        self.batch = opts.batch_size // self.world_size
        self.accumulate = max(round(hyp["nbs"] / opts.batch_size), 1)
        self.train_loader, self.train_set = create_dataloader(
            self.data.split("train"), self.data.classes, self.max_size, self.batch, stride, augment=True,
            hyp=hyp, rect=opts.rect, workers=opts.workers, shuffle=True, seed=opts.seed,
            rank=self.rank, world_size=self.world_size, cache_images=opts.cache_images, verbose=self.main,
            need_boxes=True)
        if opts.rect:
            self.train_set.hyp["mosaic"] = 0.0
        self.val_loader = None
        if self.main:
            self.val_loader, _ = create_dataloader(
                self.data.split("valid"), self.data.classes, self.test_size, self.batch * 2, stride,
                rect=True, workers=opts.workers, cache_images=opts.cache_images, need_boxes=True)
        self.loss_fn = YoloLoss(self.model.yolo_heads, hyp, self.max_size)
        for h in self.hooks:
            self.model = h.prepare_model(self, self.model)
        # channels-last activations: a CPU training step at 224 took 544 ms instead of 645 ms
        self.model.to(self.device, memory_format=torch.channels_last)
        self.optimizer = self._build_optimizer()
        self.ema = ModelEMA(self.model) if opts.ema else None
        self.amp = opts.amp and self.device.type == "cuda"
        if opts.amp and not self.amp:
            print("warning: --amp needs CUDA; training in float32 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_epoch, self.best_fitness = 0, -1.0
        self.run_dir = self.weights_dir = None
        if self.main:  # made only now, so a run refused while setting up leaves no empty folder behind
            self._open_run_dir()
        if self.resume_ckpt:
            self._load_train_state(self.resume_ckpt)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)
        else:
            self.train_model = self.model
        if self.main:
            self._write_options()

    def _open_run_dir(self) -> None:
        """The run folder: the resumed checkpoint's, else a new one (or the named one with --exist-ok).

        Nothing the run writes may be one of its inputs (``--weights`` of a run folder reused with
        --exist-ok, say); temporaries an interrupted save left are removed.
        """
        opts = self.opts
        if self.resume_ckpt:
            self.run_dir = run_dir_of(opts.resume)
            self.weights_dir = Path(opts.resume).resolve().parent
        else:
            self.run_dir = new_run_dir(opts.project, opts.name, opts.exist_ok)
            self.weights_dir = self.run_dir / "weights"
        inputs = [opts.weights, opts.t_weights, opts.t_cfg, opts.cfg, opts.hyp, self.data_file]
        plan = OutputPlan(inputs, exist_ok=True)
        for f in (*OUTPUT_FILES, "results.png"):
            plan.add(self.run_dir / f)
        for f in ("last.pt", "best.pt"):
            plan.add(self.weights_dir / f)
        plan.check()

    def _build_model(self) -> Darknet:
        opts = self.opts
        if self.resume_ckpt:
            return Darknet(parse_cfg(self.resume_ckpt["cfg"], f"{opts.resume} (embedded cfg)"))
        if opts.cfg or not opts.weights.endswith(".pt"):
            cfg = read_cfg(in_repo(opts.cfg or DEFAULT_CFG))
        else:  # fine-tuning a checkpoint (pruned or not) keeps the architecture it was saved with
            cfg = parse_cfg(load_checkpoint(opts.weights)["cfg"], f"{opts.weights} (embedded cfg)")
        if cfg.classes != self.data.classes:
            print(f"{cfg.source}: {cfg.classes} classes, {self.data_file} has {self.data.classes}: "
                  f"resizing the heads")
            cfg = with_classes(cfg, self.data.classes)
        return load_model(opts.weights or None, cfg)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        hyp, opts = self.hyp, self.opts
        decay, no_decay, biases = [], [], []
        for m in self.model.modules():
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                biases.append(m.bias)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                no_decay.append(m.weight)
            elif isinstance(getattr(m, "weight", None), nn.Parameter):
                decay.append(m.weight)
        wd = hyp["weight_decay"] * opts.batch_size * self.accumulate / hyp["nbs"]
        if opts.adam:
            opt = torch.optim.Adam(no_decay, lr=self.lr0, betas=(hyp["momentum"], 0.999))
        else:
            opt = torch.optim.SGD(no_decay, lr=self.lr0, momentum=hyp["momentum"], nesterov=True)
        opt.add_param_group({"params": decay, "weight_decay": wd})
        opt.add_param_group({"params": biases})
        for g in opt.param_groups:
            g["initial_lr"] = self.lr0
        return opt

    def _load_train_state(self, ckpt: dict) -> None:
        meta = ckpt["meta"]
        state = meta["train_state"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema:
            self.ema.ema.load_state_dict(ckpt["model"])
            self.ema.updates = state["ema_updates"]
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = meta["epoch"] + 1
        self.best_fitness = self._saved_best_fitness(meta["best_fitness"])
        self.model.seen = meta.get("seen", 0)
        print(f"resuming {self.opts.resume} from epoch {self.start_epoch} of {self.opts.epochs}")

    def _saved_best_fitness(self, recorded: float) -> float:
        """The best fitness of the ``best.pt`` on disk: the one to beat. ``best.pt`` is written before
        ``last.pt`` records its fitness, but a run older than that order, or a best.pt removed by hand,
        could leave the record ahead of the file, and the better epoch would then never be saved."""
        if self.weights_dir is None:  # another DDP rank: rank 0 saves
            return recorded
        best = self.weights_dir / "best.pt"
        if not best.is_file():
            return -1.0
        try:
            saved = float(load_checkpoint(best)["meta"].get("fitness", -1.0))
        except UserError:
            return -1.0
        if saved != recorded:
            print(f"{best} holds fitness {saved:.4f}, the checkpoint recorded {recorded:.4f}: "
                  f"{best} is replaced by the first epoch that beats it")
        return saved

    def _write_options(self) -> None:
        atomic_write(self.run_dir / "opt.yaml", yaml.safe_dump(
            {**dataclasses.asdict(self.opts), "data_resolved": str(self.data_file),
             "accumulate": self.accumulate, "world_size": self.world_size}, sort_keys=False))
        atomic_write(self.run_dir / "hyp.yaml", yaml.safe_dump(self.hyp, sort_keys=False))

    # ---------------------------------------------------------------- loop
    def fit(self) -> EvalResult | None:
        self.setup()
        epoch, result = self.start_epoch, None
        writer = self.writer = self._tensorboard()
        try:
            for epoch in range(self.start_epoch, self.opts.epochs):
                self.epoch = epoch
                t0 = time.time()
                train_losses, extra_losses = self.train_one_epoch(epoch)
                final = epoch == self.opts.epochs - 1
                result = None
                if self.main and (not self.opts.notest or final):
                    result = self.validate()
                for h in self.hooks:
                    h.on_epoch_end(self, epoch, result)
                if self.main:
                    row = self._log_epoch(epoch, train_losses, extra_losses, result, time.time() - t0,
                                          writer)
                    if not self.opts.nosave or final:
                        self._save(epoch, row)
        except KeyboardInterrupt:
            if self.main and self.weights_dir is not None and hasattr(self, "optimizer"):
                self._save(epoch - 1, None, interrupted=True)
                print(f"\ninterrupted in epoch {epoch}: saved {self.weights_dir / 'last.pt'}; "
                      f"--resume repeats that epoch from the saved weights")
            raise
        finally:
            if writer is not None:
                writer.close()
                self.writer = None
            if self.world_size > 1 and getattr(self, "owns_process_group", False):
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
        if self.main:
            self._plot()
        return result

    def train_one_epoch(self, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One pass over the training set: the mean detection losses (box, obj, cls) and the mean of
        each term the hooks added (e.g. ``kd_cls``)."""
        opts, hyp = self.opts, self.hyp
        model, optimizer = self.train_model, self.optimizer
        model.train()
        set_epoch(self.train_loader, epoch)
        for h in self.hooks:
            h.on_epoch_start(self, epoch)
        nb = len(self.train_loader)
        total_iters = nb * opts.epochs
        # warm-up: at least 100 batches, at most half the run; none with warmup_epochs 0 (fine-tuning)
        n_warmup = min(max(round(hyp["warmup_epochs"] * nb), 100), total_iters // 2) \
            if hyp["warmup_epochs"] > 0 else 0
        lr_epoch = cosine(epoch, opts.epochs, hyp["lrf"])
        mean_losses = torch.zeros(3)
        mean_extras: dict[str, float] = {}
        pbar = enumerate(self.train_loader)
        if self.main:
            from tqdm import tqdm

            pbar = tqdm(pbar, total=nb, desc=f"{epoch + 1}/{opts.epochs}",
                        bar_format="{l_bar}{bar:10}{r_bar}")
        optimizer.zero_grad()
        pending = 0
        for i, (imgs, targets, _, _) in pbar:
            ni = i + nb * epoch
            imgs = imgs.to(self.device, non_blocking=True, memory_format=torch.channels_last).float() / 255
            self._set_lr(ni, n_warmup, lr_epoch)
            if opts.multi_scale:
                imgs = self._rescale(imgs, epoch, i)
            with torch.autocast(self.device.type, enabled=self.amp):
                preds = model(imgs)
            out = self.loss_fn(preds, targets, tuple(imgs.shape[2:]))
            loss = out.total
            extras = {}
            for h in self.hooks:
                extras.update(h.extra_losses(self, imgs, targets, preds, out))
            for name, extra in extras.items():
                loss = loss + extra
                # per image, as the detection components are logged
                value = extra.detach().item() / imgs.shape[0]
                mean_extras[name] = (mean_extras.get(name, 0.0) * i + value) / (i + 1)
            if self.world_size > 1:
                loss = loss * self.world_size  # DDP averages gradients over ranks; keep the sum
            self.scaler.scale(loss).backward()
            pending += 1
            if pending == self.accumulate or i == nb - 1:
                self._optimizer_step()
                pending = 0
            unwrap(model).seen += imgs.shape[0] * self.world_size
            mean_losses = (mean_losses * i + out.components.cpu()) / (i + 1)
            if self.main:
                kd = "".join(f" {k} {v:.4f}" for k, v in mean_extras.items())
                pbar.set_postfix_str(f"box {mean_losses[0]:.4f} obj {mean_losses[1]:.4f} "
                                     f"cls {mean_losses[2]:.4f}{kd} targets {len(targets)} "
                                     f"size {imgs.shape[-1]}")
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} in epoch {epoch + 1}, batch {i}: lower lr0 "
                                f"(--hyp) or check the labels")
        if self.world_size > 1:
            self._average_bn_statistics()
        return mean_losses, mean_extras

    def _average_bn_statistics(self) -> None:
        """DDP keeps weights equal but each rank's BN statistics saw its own shard: average them."""
        import torch.distributed as dist

        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for buf in (m.running_mean, m.running_var):
                    dist.all_reduce(buf)
                    buf.div_(self.world_size)

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        for h in self.hooks:
            h.after_backward(self)
        nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def _set_lr(self, ni: int, n_warmup: int, lr_epoch: float) -> None:
        hyp = self.hyp
        for j, g in enumerate(self.optimizer.param_groups):
            target = self.lr0 * lr_epoch
            if ni < n_warmup:
                start = hyp["warmup_bias_lr"] if j == 2 else 0.0  # biases start high, the rest at zero
                g["lr"] = float(np.interp(ni, [0, n_warmup], [start, target]))
                if "momentum" in g:
                    g["momentum"] = float(np.interp(ni, [0, n_warmup], [hyp["warmup_momentum"],
                                                                         hyp["momentum"]]))
            else:
                g["lr"] = target
                if "momentum" in g:
                    g["momentum"] = hyp["momentum"]

    def _rescale(self, imgs: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
        """Multi-scale: a size between the min and max --img-size, new every ``accumulate`` batches."""
        stride = self.model.max_stride
        rng = np.random.default_rng((self.opts.seed, epoch, i // self.accumulate))
        size = int(rng.integers(self.min_size // stride, self.max_size // stride + 1)) * stride
        if size == imgs.shape[-1]:
            return imgs
        return nn.functional.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)

    def validate(self) -> EvalResult:
        model = self.ema.ema if self.ema else self.model
        return evaluate(model, self.val_loader, self.data.names, loss_fn=self.loss_fn, verbose=False)

    # ---------------------------------------------------------------- outputs
    def _tensorboard(self):
        if not self.main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir))

    def _log_epoch(self, epoch: int, losses: torch.Tensor, extras: dict[str, float],
                   result: EvalResult | None, seconds: float, writer) -> dict[str, float]:
        nan = float("nan")
        r = result
        row = dict(zip(RESULT_COLUMNS, [
            epoch, *losses.tolist(), r.mp if r else nan, r.mr if r else nan, r.map50 if r else nan,
            r.map if r else nan, *(r.losses if r else [nan] * 3), self.optimizer.param_groups[0]["lr"],
            seconds]))
        row.update({f"train/{k}": v for k, v in extras.items()})
        columns = RESULT_COLUMNS + [f"train/{k}" for k in extras]
        path = self.run_dir / "results.csv"
        rows = []
        if path.exists():  # a resumed run drops rows of epochs it is about to redo
            with path.open() as fh:
                rows = [x for x in csv.DictReader(fh) if int(x["epoch"]) < epoch]
        rows.append(row)
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
        atomic_write(path, text.getvalue())  # a kill mid-write keeps the previous epochs' rows
        if writer is not None:
            for k, v in row.items():
                if k != "epoch" and not math.isnan(v):
                    writer.add_scalar(k, v, epoch)
            writer.flush()
        if r:
            print(f"epoch {epoch + 1}: P {r.mp:.3f} R {r.mr:.3f} mAP@0.5 {r.map50:.4f} "
                  f"mAP@0.5:0.95 {r.map:.4f} ({seconds:.0f} s)")
        return row

    def _fitness(self, row: dict | None) -> float:
        if not row or math.isnan(row["metrics/mAP_0.5"]):
            return -1.0
        return 0.1 * row["metrics/mAP_0.5"] + 0.9 * row["metrics/mAP_0.5:0.95"]

    def _save(self, epoch: int, row: dict | None, interrupted: bool = False) -> None:
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        fitness = self._fitness(row)
        best = fitness > self.best_fitness
        if best:
            self.best_fitness = fitness
        model = self.ema.ema if self.ema else self.model
        train_state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict(), "ema_updates": self.ema.updates if self.ema else 0,
                       "torch_rng": torch.get_rng_state()}
        model.seen = self.model.seen
        meta = {"epoch": epoch, "best_fitness": self.best_fitness, "fitness": fitness,
                "names": self.data.names,
                "hyp": self.hyp, "opts": dataclasses.asdict(self.opts), "run_dir": str(self.run_dir),
                "results": row, "interrupted": interrupted, "seen": self.model.seen,
                "train_state": train_state, "img_size": self.test_size}
        # best.pt first: last.pt records this epoch as the best, and a resumed run trusts that record
        if best and not interrupted:
            save_checkpoint(self.weights_dir / "best.pt", model, **meta)
        save_checkpoint(self.weights_dir / "last.pt", model, **meta)

    def _plot(self) -> None:
        from utils.plots import plot_results

        csv_path = self.run_dir / "results.csv"
        if csv_path.exists():
            plot_results(csv_path, self.run_dir / "results.png")

