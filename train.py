"""train.py: train a darknet-cfg detector (the built-in shapes benchmark by default).

    python train.py                                   # yolo-small on the built-in benchmark
    python train.py --cfg cfg/yolov3-tiny.cfg --data my.data --weights yolov3-tiny.weights --epochs 100
    python train.py --resume runs/train/exp/weights/last.pt
    python train.py -sr --s 0.001 --prune 1           # BN-L1 sparse training before slim/shortcut pruning
    python train.py --weights pruned.pt --t_weights teacher.pt --KDstr 4   # fine-tune with distillation
    torchrun --nproc_per_node 2 train.py --device cpu # DistributedDataParallel (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.cli import (
    BATCH,
    BITS,
    EPOCH_OR_NEVER,
    EPOCHS,
    FRACTION,
    IMG_SIZE,
    NONNEGATIVE,
    POSITIVE,
    SEED,
    SPARSITY,
    WORKERS,
    Parser,
    run_cli,
)
from utils.errors import UserError
from utils.trainer import Trainer, TrainOptions


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions()
    p = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=d.cfg,
                   help="model cfg (default: the cfg inside a .pt --weights, else cfg/yolo-small.cfg)")
    p.add_argument("--data", default=d.data, help=".data file (default: built-in shapes benchmark)")
    p.add_argument("--weights", default=d.weights, help="initial weights: .pt, or darknet weights for --cfg")
    p.add_argument("--epochs", type=EPOCHS, default=d.epochs)
    p.add_argument("--batch-size", type=BATCH, default=d.batch_size, help="total over all processes")
    p.add_argument("--img-size", type=IMG_SIZE, nargs="+", default=d.img_size,
                   help="[min-train max-train] test")
    p.add_argument("--multi-scale", action="store_true", help="vary the size between min and max train")
    p.add_argument("--rect", action="store_true", help="rectangular training batches (no mosaic)")
    p.add_argument("--resume", nargs="?", const="latest", default="",
                   help="continue a run from its last.pt (alone: the newest under --project)")
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument("--notest", action="store_true", help="only evaluate after the final epoch")
    p.add_argument("--name", default=d.name, help="run folder runs/train/<name> (numbered if it exists)")
    p.add_argument("--project", default=d.project)
    p.add_argument("--exist-ok", action="store_true", help="reuse runs/train/<name> instead of numbering")
    p.add_argument("--device", default=d.device, help="cpu, 0, cuda:1 (default: cpu)")
    p.add_argument("--adam", action=argparse.BooleanOptionalAction, default=d.adam,
                   help="Adam at lr0/10 (default); --no-adam: SGD with Nesterov momentum at lr0")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=d.ema,
                   help="exponential moving average of the weights (evaluated and saved)")
    p.add_argument("--amp", "-mpt", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--workers", type=WORKERS, default=d.workers,
                   help="dataloader processes (default: 0 on 2 cores or fewer, else min(8, cores/2))")
    p.add_argument("--seed", type=SEED, default=d.seed)
    p.add_argument("--hyp", default=d.hyp, help="YAML overriding data/hyp.scratch.yaml")
    p.add_argument("--cache-images", action="store_true", help="keep resized images in memory")
    sr = p.add_argument_group("sparse training (BN-L1, see prune/sparsity.py)")
    sr.add_argument("-sr", "--sr", action="store_true", help="add s*sign(gamma) to the selected BN gradients")
    sr.add_argument("--s", type=SPARSITY, default=d.s, help="sparsity rate")
    sr.add_argument("--prune", type=int, choices=(0, 1, 2), default=d.prune,
                    help="penalized BNs: 0 for normal/regular, 1 also shortcut-tied (shortcut/slim), "
                         "2 residual-block convs (layer)")
    sr.add_argument("--sr-schedule", choices=("constant", "global", "local"), default=d.sr_schedule,
                    help="constant; global: s*0.01 after --sr-decay-at; local: then only the "
                         "--sr-keep largest-gamma share gets s*0.01")
    sr.add_argument("--sr-decay-at", type=FRACTION, default=d.sr_decay_at,
                    help="fraction of the epochs after which the decay starts")
    sr.add_argument("--sr-keep", type=FRACTION, default=d.sr_keep,
                    help="local decay: share of channels (largest |gamma|) whose rate decays")
    kd = p.add_argument_group("knowledge distillation (see distill/hook.py and the README)")
    kd.add_argument("--KDstr", "--kd-str", dest="kd_str", type=int, choices=range(1, 6), default=d.kd_str,
                    metavar="1..5", help="strategy: 1 outputs, 2 + teacher-bounded boxes, 3 box imitation "
                    "+ classes, 4 3 + attention maps, 5 4 near the objects only")
    kd.add_argument("--t_weights", "--t-weights", dest="t_weights", default=d.t_weights,
                    help="teacher: a .pt alone, or darknet weights with --t_cfg")
    kd.add_argument("--t_cfg", "--t-cfg", dest="t_cfg", default=d.t_cfg, help="teacher cfg (darknet weights)")
    kd.add_argument("--kd-t", type=POSITIVE, default=d.kd_t, help="temperature of the class softmax")
    kd.add_argument("--kd-feat-t", type=POSITIVE, default=d.kd_feat_t,
                    help="temperature of the spatial attention softmax (4, 5)")
    kd.add_argument("--kd-cls", type=NONNEGATIVE, default=d.kd_cls, help="class KL weight (x the cls gain)")
    kd.add_argument("--kd-obj", type=NONNEGATIVE, default=d.kd_obj,
                    help="objectness KL weight (x the obj gain)")
    kd.add_argument("--kd-box", type=NONNEGATIVE, default=d.kd_box, help="box term weight (x the box gain)")
    kd.add_argument("--kd-feat", type=NONNEGATIVE, default=d.kd_feat, help="attention KL weight")
    kd.add_argument("--kd-margin", type=NONNEGATIVE, default=d.kd_margin,
                    help="strategy 2: teacher-bound margin")
    q = p.add_argument_group("quantization-aware training (see quant/ and the README)")
    q.add_argument("--quantized", default=d.quantized, metavar="1|google|2|dorefa",
                   help="1 or google: Jacob et al. scales; 2 or dorefa: DoReFa")
    q.add_argument("--w-bit", type=BITS, default=d.w_bit, help="weight bits (2-8 or 16)")
    q.add_argument("--a-bit", type=BITS, default=d.a_bit, help="activation bits (2-8 or 16)")
    q.add_argument("--BN_Fold", "--bn-fold", dest="bn_fold", action="store_true",
                   help="fold batch norms into the quantized weights (Jacob et al.)")
    q.add_argument("--FPGA", "--fpga", dest="fpga", action="store_true",
                   help="power-of-two scales and every layer quantized, image and heads included")
    q.add_argument("--a-symmetric", action="store_true", default=d.a_symmetric,
                   help="google: symmetric signed activations with zero point 0 (what TensorRT runs) "
                        "instead of affine uint8-style ones")
    q.add_argument("--dorefa-range", type=POSITIVE, default=d.dorefa_range,
                   help="DoReFa: activations are clamped to [-r, r] (the paper's r is 1)")
    q.add_argument("--freeze-bn-epoch", type=EPOCH_OR_NEVER, default=d.freeze_bn_epoch,
                   help="from this epoch folded BNs use their running statistics (-1: never)")
    q.add_argument("--freeze-observer-epoch", type=EPOCH_OR_NEVER, default=d.freeze_observer_epoch,
                   help="from this epoch activation ranges stop moving (-1: never)")
    return p


def parse_args(argv: list[str] | None = None) -> TrainOptions:
    a = build_parser().parse_args(argv)
    if a.resume == "latest":
        found = sorted(Path(a.project).glob("*/weights/last.pt"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise UserError(f"--resume: no {a.project}/*/weights/last.pt to continue; name the checkpoint")
        a.resume = str(found[-1])
    return TrainOptions(**{k: getattr(a, k) for k in TrainOptions.__dataclass_fields__})


def main(argv: list[str] | None = None):
    return Trainer(parse_args(argv)).fit()


if __name__ == "__main__":
    sys.exit(run_cli(main))
