"""Training speed on the built-in benchmark: the trainer's full step against a bare step, and the
dataloader with mosaic. Medians of repeated measurements; the ratio comes from the same run.

    .venv/bin/python -m bench.train_speed                         # yolo-small, batch 16 at 224
    .venv/bin/python -m bench.train_speed --cfg cfg/yolov3-tiny.cfg --batches 8

dataloader: images/s with mosaic on every image (the training default has mosaic off);
full step: what ``Trainer.train_one_epoch`` does per batch with the default hyperparameters (loading in
--workers processes, warm-up/LR schedule, forward, loss, backward, accumulation, EMA, progress bar);
bare step: forward + the same loss + backward + optimizer step on one batch already in memory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.options import TrainOptions, default_workers
from engine.trainer import Trainer
from utils.cli import BATCH, COUNT, IMG_SIZE, WORKERS, Parser
from utils.datasets import read_data_file, resolve_data, set_epoch
from utils.outputs import atomic_write


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m bench.train_speed",
                description=__doc__)
    ap.add_argument("--cfg", default="cfg/yolo-small.cfg")
    ap.add_argument("--batch-size", type=BATCH, default=16)
    ap.add_argument("--img-size", type=IMG_SIZE, default=224)
    ap.add_argument("--batches", type=COUNT, default=12, help="batches per measurement")
    ap.add_argument("--workers", type=WORKERS, default=default_workers())
    ap.add_argument("--repeats", type=COUNT, default=3)
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    a = build_parser().parse_args(argv)
    data = read_data_file(resolve_data(""))
    with tempfile.TemporaryDirectory() as tmp:
        n_img = a.batch_size * a.batches
        train_list = Path(tmp) / "train.txt"
        images = data.train.read_text().splitlines()[:n_img]
        atomic_write(train_list, "\n".join(str(data.train.parent / p) for p in images) + "\n")
        data_file = Path(tmp) / "bench.data"
        atomic_write(data_file, f"classes={data.classes}\ntrain={train_list}\nvalid={train_list}\n")
        opts = TrainOptions(cfg=a.cfg, data=str(data_file), epochs=100, batch_size=a.batch_size,
                            img_size=[a.img_size], workers=a.workers, project=tmp, notest=True)
        t = Trainer(opts)
        t.setup()
        loader = t.train_loader

        # dataloader alone (mosaic, affine, HSV, flips, collate)
        load_rates = []
        mosaic = t.train_set.hyp["mosaic"]
        t.train_set.hyp["mosaic"] = 1.0
        for r in range(a.repeats):
            set_epoch(loader, r)
            t0 = time.perf_counter()
            n = sum(imgs.shape[0] for imgs, *_ in loader)
            load_rates.append(n / (time.perf_counter() - t0))
        t.train_set.hyp["mosaic"] = mosaic

        # full trainer step
        full = []
        for r in range(a.repeats):
            t0 = time.perf_counter()
            t.train_one_epoch(r + 1)
            full.append((time.perf_counter() - t0) / len(loader))

        # bare step on one in-memory batch
        imgs, targets, _, _ = next(iter(loader))
        x = imgs.contiguous(memory_format=torch.channels_last).float() / 255  # as the trainer feeds it
        model, opt = t.model, t.optimizer
        model.train()
        bare = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for _ in range(a.batches):
                out = t.loss_fn(model(x), targets, tuple(x.shape[2:]))
                out.total.backward()
                opt.step()
                opt.zero_grad()
            bare.append((time.perf_counter() - t0) / a.batches)

    f, b = statistics.median(full), statistics.median(bare)
    print(f"{a.cfg} batch {a.batch_size} at {a.img_size}, {torch.get_num_threads()} threads, "
          f"{a.workers} loader workers, median of {a.repeats} x {a.batches} batches")
    print(f"dataloader with mosaic: {statistics.median(load_rates):.1f} images/s")
    print(f"full train step:        {1000 * f:.0f} ms/batch = {a.batch_size / f:.1f} images/s")
    print(f"bare fwd+loss+bwd+opt:  {1000 * b:.0f} ms/batch = {a.batch_size / b:.1f} images/s")
    print(f"overhead ratio full/bare: {f / b:.3f}")
    return [{"setting": f"{Path(a.cfg).name} batch {a.batch_size} at {a.img_size}, {a.workers} workers",
             "loader_images_per_s": statistics.median(load_rates), "full_step_ms": 1000 * f,
             "bare_step_ms": 1000 * b, "full_over_bare": f / b}]


if __name__ == "__main__":
    main()
