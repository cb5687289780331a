"""train.py end to end on a tiny benchmark copy: outputs, hooks, Ctrl-C + exact resume, DDP, test.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import test as test_script
import train as train_script
from engine.hooks import TrainHook
from models.io import load_checkpoint, save_darknet_weights
from stages.train import TrainJob, resumed, trainer
from tests.conftest import REPO
from utils.errors import UserError


def tiny_opts(data: Path, project: Path, **kw) -> TrainJob:
    base = dict(data=str(data), project=str(project), epochs=3, batch_size=4, img_size=[64], workers=0,
                seed=3)
    return TrainJob.from_record({**base, **kw})


class StopAt(TrainHook):
    """Simulates Ctrl-C at the start of an epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class Recorder(TrainHook):
    def __init__(self):
        self.steps = 0
        self.extra_calls = 0
        self.grad_seen = []

    def extra_losses(self, trainer, imgs, targets, preds, loss):
        self.extra_calls += 1
        assert loss.components.shape == (3,)
        assert len(loss.positives) == len(preds)
        return {"zero": 0.0 * preds[0].sum()}

    def after_backward(self, trainer):
        self.steps += 1
        bn = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        self.grad_seen.append(bn.weight.grad is not None)


def test_train_writes_its_outputs_and_calls_hooks(shapes_data, tmp_path):
    rec = Recorder()
    result = trainer(tiny_opts(shapes_data, tmp_path, epochs=2), [rec]).fit()
    run = tmp_path / "exp"
    for f in ("weights/last.pt", "weights/best.pt", "results.csv", "results.png", "opt.yaml", "hyp.yaml"):
        assert (run / f).is_file(), f
    assert list(run.glob("events.out.tfevents.*"))
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # epochs counted from 1, as on the console
    assert 0.0 <= result.map50 <= 1.0
    # 2 batches of 4 per epoch, accumulate = nbs 16 / 4 = 4: one optimizer step per epoch (flushed at its end)
    assert rec.extra_calls == 4 and rec.steps == 2 and all(rec.grad_seen)
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    meta = ckpt["meta"]
    assert meta["epoch"] == 1 and meta["names"][0] == "circle" and "optimizer" in meta["train_state"]
    assert not dist.is_initialized()  # a single process starts no process group


@pytest.mark.parametrize(("nbs", "steps"), [(4, 4), (8, 2), (64, 2)])
def test_gradients_accumulate_to_the_nominal_batch(shapes_data, tmp_path, nbs, steps):
    """2 epochs of 2 batches of 4: nbs 4 steps every batch, nbs 8 every second one, and nbs 64 once per
    epoch (the partial accumulation is flushed at the epoch's end); weight decay follows nbs."""
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(f"nbs: {nbs}\n")
    rec = Recorder()
    t = trainer(tiny_opts(shapes_data, tmp_path, epochs=2, notest=True, hyp=str(hyp)), [rec])
    t.fit()
    assert rec.steps == steps
    assert t.accumulate == max(round(nbs / 4), 1)
    assert t.optimizer.param_groups[1]["weight_decay"] == pytest.approx(0.0005 * 4 * t.accumulate / nbs)


def test_interrupt_saves_last_and_resume_matches_uninterrupted(shapes_data, tmp_path):
    trainer(tiny_opts(shapes_data, tmp_path, name="full")).fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny_opts(shapes_data, tmp_path, name="cut"), [StopAt(2)]).fit()
    last = tmp_path / "cut" / "weights" / "last.pt"
    meta = load_checkpoint(last)["meta"]
    assert meta["interrupted"] and meta["epoch"] == 1
    assert (tmp_path / "cut" / "results.png").is_file()  # an interrupted run is plotted too
    trainer(resumed(str(last))).fit()
    full = load_checkpoint(tmp_path / "full" / "weights" / "last.pt")
    after = load_checkpoint(last)
    assert after["meta"]["epoch"] == 2
    for k, v in full["meta"]["train_state"]["model"].items():
        assert torch.equal(v, after["meta"]["train_state"]["model"][k]), k
    for k, v in full["model"].items():  # the EMA weights too
        assert torch.equal(v, after["model"][k]), k
    rows = lambda run: list(csv.DictReader((tmp_path / run / "results.csv").open()))  # noqa: E731
    assert [r["train/box"] for r in rows("full")] == [r["train/box"] for r in rows("cut")]


def test_resume_of_a_checkpoint_older_than_a_hyp_key_takes_its_default(shapes_data, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny_opts(shapes_data, tmp_path, epochs=2), [StopAt(1)]).fit()
    last = tmp_path / "exp" / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["meta"]["hyp"]["adam_lr_ratio"] == 0.3
    del ckpt["meta"]["hyp"]["nbs"]  # as written before nbs existed
    del ckpt["meta"]["hyp"]["adam_lr_ratio"]  # and before Adam's ratio: it ran Adam at lr0 / 10
    torch.save(ckpt, last)
    t = trainer(resumed(str(last)))
    assert t.hyp["nbs"] == 16 and t.hyp["lr0"] == ckpt["meta"]["hyp"]["lr0"]
    assert t.lr0 == pytest.approx(ckpt["meta"]["hyp"]["lr0"] / 10)
    t.fit()


def test_resume_of_a_finished_run_is_a_clear_error(shapes_data, tmp_path):
    trainer(tiny_opts(shapes_data, tmp_path, epochs=1)).fit()
    with pytest.raises(UserError, match="already finished"):
        trainer(resumed(str(tmp_path / "exp" / "weights" / "last.pt")))


def run_two_ranks(tmp_path: Path, body: str, port: int) -> tuple[dict, dict]:
    """Run ``body`` (Python that builds a trainer ``t`` and fits it, and sets ``saved``: a dict of
    tensors or of state dicts) under torchrun in 2 CPU processes; each rank's ``saved``, rank 0 first."""
    script = tmp_path / f"ddp_{port}.py"
    out = f"os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt')"
    script.write_text(f"import os, sys, torch\nsys.path.insert(0, {str(REPO)!r})\n"
                      f"{body}torch.save(saved, {out})\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), str(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return tuple(torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))


def test_ddp_two_processes_end_with_identical_weights(shapes_data, tmp_path):
    a, b = run_two_ranks(tmp_path, (
        "from engine.options import TrainOptions\n"
        "from engine.trainer import Trainer\n"
        f"t = Trainer(TrainOptions(data={str(shapes_data)!r}, project={str(tmp_path)!r}, epochs=1,"
        " batch_size=4, img_size=[64], workers=0, device='cpu', notest=True))\n"
        "t.fit()\n"
        "saved = t.model.state_dict()\n"), port=29533)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "exp" / "weights" / "last.pt").is_file()  # only rank 0 writes


def test_bad_hyp_key_and_bad_img_size_are_clear_errors(shapes_data, tmp_path):
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("lr0: 0.01\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="learning_rate"):
        trainer(tiny_opts(shapes_data, tmp_path, hyp=str(hyp)))
    with pytest.raises(UserError, match="--img-size 72"):
        trainer(tiny_opts(shapes_data, tmp_path, img_size=[72])).fit()


def test_test_py_on_pt_and_on_cfg_plus_weights_agree(shapes_data, tmp_path, capsys):
    trainer(tiny_opts(shapes_data, tmp_path, epochs=1)).fit()
    pt = tmp_path / "exp" / "weights" / "last.pt"
    capsys.readouterr()
    r1 = test_script.main(["--weights", str(pt), "--data", str(shapes_data), "--img-size", "64",
                           "--project", str(tmp_path / "t"), "--workers", "0", "--save-json"])
    printed = capsys.readouterr().out
    assert f"classes ignored: mAP@0.5 {r1.coco['map50_any_class']:.4f}" in printed
    assert "mAP@0.5:0.95 by box area: small (< 32² px)" in printed
    from models.io import load_model

    model = load_model(pt)
    cfg = tmp_path / "m.cfg"
    cfg.write_text(model.cfg_text)
    save_darknet_weights(model, tmp_path / "m.weights")
    r2 = test_script.main(["--weights", str(tmp_path / "m.weights"), "--cfg", str(cfg), "--data",
                           str(shapes_data), "--img-size", "64", "--project", str(tmp_path / "t"),
                           "--workers", "0"])
    assert r1.map == pytest.approx(r2.map, abs=1e-6) and r1.map50 == pytest.approx(r2.map50, abs=1e-6)
    assert r1.coco["map"] == pytest.approx(r1.map, abs=0.005)
    out = tmp_path / "t" / "exp"
    assert (out / "pr_curve.png").stat().st_size > 0 and (out / "confusion_matrix.png").is_file()
    assert (out / "detections.json").is_file() and (out / "detections_gt.json").is_file()


def test_resume_alone_finds_the_newest_last_pt(shapes_data, tmp_path):
    with pytest.raises(UserError, match=r"no .*last\.pt"):
        train_script.parse_args(["--resume", "--project", str(tmp_path)])
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny_opts(shapes_data, tmp_path, epochs=2), [StopAt(1)]).fit()
    job = train_script.parse_args(["--resume", "--project", str(tmp_path)])
    assert job.core.resume == str(tmp_path / "exp" / "weights" / "last.pt")
    assert job.core.epochs == 2 and job.core.name == "exp"  # the run's own options, restored
