"""The one training loop. Techniques join it as hooks (:mod:`engine.hooks`); it never builds them.

``Trainer(options, hooks).fit()`` trains a darknet-cfg model and writes the run folder: weights
(``last.pt``, ``best.pt``), ``results.csv``, TensorBoard events, ``opt.yaml``, ``hyp.yaml``,
``results.png``. ``stages/train.py`` (behind ``train.py``) assembles the hooks from the techniques'
option groups and hands the trainer a ``record`` of every option, which checkpoints keep so that
``--resume`` can rebuild the same run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from engine import distributed
from engine.hooks import LossGains, TrainContext, TrainHook
from engine.options import DEFAULT_CFG, TrainOptions, in_repo, load_hyp
from models.cfg import parse_cfg, read_cfg
from models.darknet import Darknet
from models.io import load_checkpoint, load_model, save_checkpoint, with_classes
from utils.datasets import DataConfig, create_dataloader, read_data_file, resolve_data, set_epoch
from utils.errors import UserError
from utils.evaluate import EvalResult, evaluate
from utils.files import new_run_dir
from utils.loss import YoloLoss
from utils.outputs import OutputPlan, atomic_write
from utils.torch_utils import ModelEMA, select_device, unwrap

OUTPUT_FILES = ("results.csv", "opt.yaml", "hyp.yaml")  # beside weights/ and results.png
RESULT_COLUMNS = ["epoch", "train/box", "train/obj", "train/cls", "metrics/precision", "metrics/recall",
                  "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box", "val/obj", "val/cls", "lr",
                  "time_s"]


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint: ``<run>/weights/last.pt`` -> ``<run>``; a checkpoint outside a
    ``weights`` folder is its own run folder."""
    folder = Path(checkpoint).resolve().parent
    return folder.parent if folder.name == "weights" else folder


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
    """``opts``: the engine's options (``resume`` set: continue the run of that ``last.pt``, whose
    options the caller has restored). ``hooks``: the techniques, in the order they act. ``record``:
    every option of the run, flat, as the command line names them; written to ``opt.yaml`` and into
    each checkpoint (default: the engine's options alone)."""

    def __init__(self, opts: TrainOptions, hooks: list[TrainHook] | None = None,
                 record: dict[str, Any] | None = None):
        self.hooks = list(hooks or [])
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.main = distributed.is_main()
        self.opts = opts
        self.record = dict(record) if record is not None else dataclasses.asdict(opts)
        self.resume_ckpt = load_checkpoint(opts.resume) if opts.resume else None
        if self.resume_ckpt:  # a checkpoint older than a hyperparameter key takes that key's default,
            # except Adam's learning-rate ratio: runs from before it ran Adam at lr0 / 10
            self.hyp = {**load_hyp(), "adam_lr_ratio": 0.1, **self.resume_ckpt["meta"]["hyp"]}
        else:
            self.hyp = load_hyp(opts.hyp)
        self.lr0 = self.hyp["lr0"] * (self.hyp["adam_lr_ratio"] if opts.adam else 1.0)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        opts, hyp = self.opts, self.hyp
        self.min_size, self.max_size, self.test_size = opts.sizes
        if self.world_size > 1:
            self.owns_process_group = distributed.start(opts.device)  # compress.py may have started it
            self.device = torch.device("cpu") if opts.device in ("", "cpu") else \
                torch.device("cuda", torch.cuda.current_device())
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
        self.accumulate = opts.accumulate or max(round(hyp["nbs"] / opts.batch_size), 1)
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
        self.amp = opts.amp and self.device.type == "cuda"
        if opts.amp and not self.amp:
            print("warning: --amp needs CUDA; training in float32 on the CPU")
        gains = LossGains(self.loss_fn.gain_box, self.loss_fn.gain_obj, self.loss_fn.gain_cls)
        self.ctx = TrainContext(self.model, self.device, opts.epochs, opts.sizes, self.amp, gains,
                                self.main, batches=len(self.train_loader))
        for h in self.hooks:
            self.model = self.ctx.model = h.prepare_model(self.ctx, self.model)
        # channels-last activations: a CPU training step at 224 took 544 ms instead of 645 ms
        self.model.to(self.device, memory_format=torch.channels_last)
        self.optimizer = self._build_optimizer()
        self.ema = ModelEMA(self.model) if opts.ema else None
        self.ctx.ema_model = self.ema.ema if self.ema else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start_epoch, self.best_fitness = 0, -1.0
        self.run_dir = self.weights_dir = None
        if self.main:  # made only now, so a run refused while setting up leaves no empty folder behind
            self._open_run_dir()
            self.ctx.run_dir = self.run_dir
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
        inputs = [opts.weights, opts.cfg, opts.hyp, self.data_file,
                  *(f for h in self.hooks for f in h.inputs())]
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
        return load_model(opts.weights or None, cfg, transfer=True)

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
        hook_params = self._hook_parameters()
        if hook_params:  # e.g. a distillation adaptation layer: trained like the model, never saved in it
            opt.add_param_group({"params": hook_params, "weight_decay": wd})
        for g in opt.param_groups:
            g["initial_lr"] = self.lr0
        return opt

    def _hook_parameters(self) -> list[nn.Parameter]:
        return [p for h in self.hooks for p in h.parameters()]

    def _hook_states(self) -> dict[str, dict]:
        return {type(h).__name__: state for h in self.hooks if (state := h.state_dict())}

    def _load_train_state(self, ckpt: dict) -> None:
        meta = ckpt["meta"]
        state = meta["train_state"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        hook_states = state.get("hooks", {})  # by hook class: the hooks a resume rebuilds, in any order
        for h in self.hooks:
            h.load_state_dict(hook_states.get(type(h).__name__, {}))
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
            {**self.record, "data_resolved": str(self.data_file),
             "accumulate": self.accumulate, "world_size": self.world_size}, sort_keys=False))
        atomic_write(self.run_dir / "hyp.yaml", yaml.safe_dump(self.hyp, sort_keys=False))

    # ---------------------------------------------------------------- loop
    def fit(self) -> EvalResult | None:
        self.setup()
        epoch, result = self.start_epoch, None
        writer = self.ctx.writer = self._tensorboard()
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
                    h.on_epoch_end(self.ctx, epoch, result)
                if self.main:
                    row = self._log_epoch(epoch, train_losses, extra_losses, result, time.time() - t0,
                                          writer)
                    if not self.opts.nosave or final:
                        self._save(epoch, row)
        except KeyboardInterrupt:
            if self.main and self.weights_dir is not None and hasattr(self, "optimizer"):
                self._save(epoch - 1, None, interrupted=True)
                print(f"\ninterrupted in epoch {epoch + 1}: saved {self.weights_dir / 'last.pt'}; "
                      f"--resume repeats that epoch from the saved weights")
            raise
        finally:
            if writer is not None:
                writer.close()
                self.ctx.writer = None
            if getattr(self, "owns_process_group", False):
                distributed.stop()
            if self.main and self.run_dir is not None:  # an interrupted run gets its plot too
                self._plot()
        if self.main:
            self._say_where()
        return result

    def train_one_epoch(self, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One pass over the training set: the mean detection losses (box, obj, cls) and the mean of
        each term the hooks added (e.g. ``kd_cls``)."""
        opts, hyp = self.opts, self.hyp
        model, optimizer = self.train_model, self.optimizer
        model.train()
        set_epoch(self.train_loader, epoch)
        for h in self.hooks:
            h.on_epoch_start(self.ctx, epoch)
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
                extras.update(h.extra_losses(self.ctx, imgs, targets, preds, out))
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
            h.after_backward(self.ctx)
        nn.utils.clip_grad_norm_([*self.model.parameters(), *self._hook_parameters()], max_norm=10.0)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if scale is None or self.scaler.get_scale() >= scale:  # AMP lowers its scale when it skips a step
            group_lr = self.optimizer.param_groups[0]["lr"]
            self.ctx.schedule_lr = self.hyp["lr0"] * group_lr / self.lr0 if self.lr0 else 0.0
            for h in self.hooks:
                h.after_step(self.ctx)
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
        return evaluate(model, self.val_loader, self.data.names, loss_fn=self.loss_fn)  # with a progress bar

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
            epoch + 1, *losses.tolist(), r.mp if r else nan, r.mr if r else nan, r.map50 if r else nan,
            r.map if r else nan, *(r.losses if r else [nan] * 3), self.optimizer.param_groups[0]["lr"],
            seconds]))
        row.update({f"train/{k}": v for k, v in extras.items()})
        columns = RESULT_COLUMNS + [f"train/{k}" for k in extras]
        path = self.run_dir / "results.csv"
        rows = []
        if path.exists():  # a resumed run drops rows of epochs it is about to redo
            with path.open() as fh:
                rows = [x for x in csv.DictReader(fh) if int(x["epoch"]) <= epoch]  # 1-based
        rows.append(row)
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
        atomic_write(path, text.getvalue())  # a kill mid-write keeps the previous epochs' rows
        if writer is not None:
            for k, v in row.items():
                if k != "epoch" and not math.isnan(v):
                    writer.add_scalar(k, v, epoch + 1)
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
                       "torch_rng": torch.get_rng_state(), "hooks": self._hook_states()}
        model.seen = self.model.seen
        meta = {"epoch": epoch, "best_fitness": self.best_fitness, "fitness": fitness,
                "names": self.data.names,
                "hyp": self.hyp, "opts": self.record, "run_dir": str(self.run_dir),
                "results": row, "interrupted": interrupted, "seen": self.model.seen,
                "train_state": train_state, "img_size": self.test_size}
        # best.pt first: last.pt records this epoch as the best, and a resumed run trusts that record
        if best and not interrupted:
            save_checkpoint(self.weights_dir / "best.pt", model, **meta)
        save_checkpoint(self.weights_dir / "last.pt", model, **meta)

    def _say_where(self) -> None:
        best = self.weights_dir / "best.pt"
        fitness = f"best.pt (fitness {self.best_fitness:.4f} = 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95), " \
            if best.is_file() else ""
        print(f"results in {self.run_dir}: weights/{fitness}weights/last.pt, results.csv, results.png")

    def _plot(self) -> None:
        from utils.plots import plot_results

        csv_path = self.run_dir / "results.csv"
        if csv_path.exists():
            plot_results(csv_path, self.run_dir / "results.png")

