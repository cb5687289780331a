"""BN-L1 sparse training: which batch norms, the schedules, strength under accumulation and AMP, logs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.hooks import TrainContext, TrainHook
from engine.options import load_hyp
from engine.trainer import Trainer
from models.darknet import Darknet
from models.graph import ChannelGraph
from models.io import load_checkpoint
from prune.blocks import residual_blocks
from prune.methods import METHODS, SPARSITY_ALIASES
from prune.policies import channel_units
from prune.sparsity import SparsityHook, SparsityOptions, sparse_convs, sparsity_scale
from stages.train import resumed, trainer
from tests.conftest import REPO
from tests.test_train import StopAt, tiny_opts
from utils.errors import UserError


def bn_gammas(model) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten() for m in model.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)])


def test_prune_modes_select_what_each_method_ranks():
    model = Darknet(REPO / "cfg" / "yolov3.cfg")
    graph = ChannelGraph(model.cfg)
    normal, tied, layer = (set(sparse_convs(model, SPARSITY_ALIASES[m])) for m in (0, 1, 2))
    assert normal < tied
    assert all(not graph.tied_convs(i) for i in normal)
    assert any(graph.tied_convs(i) for i in tied)
    assert not any(graph.fixed_reason(i) for i in tied)
    assert layer == {c for b in residual_blocks(model.cfg) for c in b.convs}
    with pytest.raises(UserError, match="unknown pruning method 'thin'"):
        sparse_convs(model, "thin")


def test_schedules_follow_their_formulas():
    g = torch.tensor([0.5, -0.9, 0.1, 0.3, 0.05, 0.7, -0.2, 0.4, 0.8, 0.6])
    const = sparsity_scale("constant", 0.01, 9, 10, 0.5, 0.2, g)
    assert torch.equal(const, torch.full_like(g, 0.01))
    assert torch.equal(sparsity_scale("global", 0.01, 4, 10, 0.5, 0.2, g), const)  # before D·E
    assert torch.allclose(sparsity_scale("global", 0.01, 5, 10, 0.5, 0.2, g), const * 0.01)
    local = sparsity_scale("local", 0.01, 5, 10, 0.5, 0.2, g)
    decayed = (local < 0.01).nonzero().flatten().tolist()
    assert sorted(decayed) == [1, 8]  # the 20 % largest |γ|: -0.9 and 0.8
    assert torch.equal(sparsity_scale("local", 0.01, 4, 10, 0.5, 0.2, g), const)


@pytest.mark.parametrize("name", ["slim", "shortcut", "layer_channel"])
def test_local_schedule_ranked_by_layer_keeps_each_layers_share_with_tied_channels_together(name):
    model = Darknet(REPO / "cfg" / "yolo-small.cfg")
    convs = sparse_convs(model, name)
    gen = torch.Generator().manual_seed(0)
    for i in convs:  # |γ| in [1, 2] at random (a tied group's first member is not always its best), the
        bn = model.layers[i].bn  # last layer's in [0.5, 0.6]
        low, width = (0.5, 0.1) if i == convs[-1] else (1.0, 1.0)
        bn.weight.data = (low + width * torch.rand(bn.num_features, generator=gen)) * torch.where(
            torch.rand(bn.num_features, generator=gen) < 0.5, -1.0, 1.0)
    ctx = TrainContext(model=model, device=torch.device("cpu"), epochs=4, sizes=(64, 64, 64), amp=False,
                       gains=None, main=True)
    kept = {}
    for rank in ("global", "layer"):
        hook = SparsityHook(1.0, name, "local", decay_at=0, keep=0.4, rank=rank)
        hook.on_epoch_start(ctx, 0)
        kept[rank] = {i: (scale < 1.0).tolist() for i, scale in zip(convs, hook.scales)}
    assert not any(kept["global"][convs[-1]])  # a global share empties the layers with smaller γ
    gammas = {i: model.layers[i].bn.weight.detach().abs() for i in convs}
    first = METHODS[name].group_score == "first"
    units = channel_units(ChannelGraph(model.cfg), convs)
    for unit in units:
        flags = [{kept["layer"][i][c] for i, c in chans} for chans in unit]
        assert all(len(f) == 1 for f in flags)  # tied channels are kept or penalized together
        scores = [float(gammas[chans[0][0]][chans[0][1]]) if first else
                  max(float(gammas[i][c]) for i, c in chans) for chans in unit]
        best = sorted(range(len(unit)), key=lambda k: -scores[k])[:math.ceil(0.4 * len(unit))]
        assert [k for k, f in enumerate(flags) if f == {True}] == sorted(best)
    assert {i for unit in units for chans in unit for i, _ in chans} == set(convs)


def uneven_cut(model: Darknet, method: str):
    """A cut of ``model``'s cfg for ``method``: unit u keeps 1/4, 2/4 or 3/4 of its groups by turns."""
    target = model.cfg.copy()
    target.source = "cut.cfg"
    graph = ChannelGraph(model.cfg)
    for u, unit in enumerate(channel_units(graph, METHODS[method].channel_convs(graph))):
        for i in {i for i, _ in unit[0]}:
            per = sum(1 for j, _ in unit[0] if j == i)
            target.layers[i].set("filters", per * max(1, (u % 3 + 1) * len(unit) // 4))
    return target


@pytest.mark.parametrize("cfg,name", [("yolo-small", "slim"), ("yolo-small", "shortcut"),
                                      ("yolov4-tiny", "slim"), ("yolo-small", "regular")])
def test_keep_from_a_cut_spares_exactly_the_channels_pruning_to_that_cut_keeps(cfg, name):
    """--sr-keep-from: in every layer the channels whose penalty decays are the ones
    ``--widths-from`` with the same cfg keeps, so the sparse stage empties exactly what it removes."""
    from prune.methods import plan

    model = Darknet(REPO / "cfg" / f"{cfg}.cfg")
    gen = torch.Generator().manual_seed(1)
    for i in sparse_convs(model, name):
        bn = model.layers[i].bn
        bn.weight.data = (0.5 + torch.rand(bn.num_features, generator=gen)) * torch.where(
            torch.rand(bn.num_features, generator=gen) < 0.5, -1.0, 1.0)
    target = uneven_cut(model, name)
    hook = SparsityHook(1.0, name, "local", decay_at=0, rank="layer", keep_from=target)
    ctx = TrainContext(model=model, device=torch.device("cpu"), epochs=4, sizes=(64, 64, 64), amp=False,
                       gains=None, main=True)
    hook.on_epoch_start(ctx, 0)
    spared = {i: scale < 1.0 for i, scale in zip(hook.convs, hook.scales)}
    masks = plan(model, name, widths=target).channels.masks
    assert set(spared) == set(masks)
    for i, mask in masks.items():
        assert torch.equal(spared[i], mask), f"layer {i}"
        assert int(mask.sum()) == target.layers[i]["filters"]


def test_keep_from_options_that_cannot_work_are_one_line_errors(tmp_path):
    cut = tmp_path / "cut.cfg"
    cut.write_text((REPO / "cfg" / "yolov3-tiny.cfg").read_text())
    local = {"sr": True, "sr_schedule": "local", "sr_keep_from": str(cut)}
    with pytest.raises(UserError, match=r"--sr-keep-from .*cut\.cfg: it gives each layer its own count"):
        SparsityOptions(**local).check()
    with pytest.raises(UserError, match=r"--sr-keep 0\.5: does nothing with --sr-keep-from"):
        SparsityOptions(**local, sr_rank="layer", sr_keep=0.5).check()
    with pytest.raises(UserError, match="layer_channel pruning does not take its widths from a cfg"):
        SparsityOptions(**local, sr_rank="layer", prune_method="layer_channel").check()
    with pytest.raises(UserError, match="--sr-keep-from: does nothing without -sr"):
        SparsityOptions(sr_keep_from=str(cut)).check()
    with pytest.raises(UserError, match=r"missing\.cfg"):
        SparsityOptions(**{**local, "sr_keep_from": str(tmp_path / "missing.cfg")}, sr_rank="layer",
                        prune_method="slim").hook()
    options = SparsityOptions(**local, sr_rank="layer", prune_method="slim")
    options.check()
    hook = options.hook()  # yolov3-tiny's cfg is no cut of yolo-small: said when training starts
    assert hook.inputs() == [str(cut)]  # an input of the run: never written over
    ctx = TrainContext(model=Darknet(REPO / "cfg" / "yolo-small.cfg"), device=torch.device("cpu"), epochs=1,
                       sizes=(64, 64, 64), amp=False, gains=None, main=True)
    with pytest.raises(UserError, match=r"cut\.cfg: .* not a cut of this network"):
        hook.on_epoch_start(ctx, 0)
    with pytest.raises(UserError, match="needs --sr-schedule local --sr-rank layer"):
        SparsityHook(1.0, "slim", "local", rank="global", keep_from=hook.keep_from)


class GradProbe(TrainHook):
    """Records the γ gradients of ``sparsity``'s batch norms that it sees in ``after_backward`` (place it
    before or after the penalty). With ``amp_scale`` it gives ``owner`` a real, enabled loss scaler, as
    CUDA AMP uses (the test reaches into the trainer; no hook may)."""

    def __init__(self, sparsity: SparsityHook, amp_scale: float | None = None):
        self.seen: list[torch.Tensor] = []
        self.sparsity, self.amp_scale, self.owner = sparsity, amp_scale, None

    def on_epoch_start(self, ctx, epoch):
        if self.amp_scale and epoch == 0:
            self.owner.scaler = torch.amp.GradScaler("cpu", init_scale=self.amp_scale)

    def after_backward(self, ctx):
        self.seen.append(torch.cat([bn.weight.grad.flatten() for bn in self.sparsity.bns]).clone())


def penalty_per_step(data, project, batch_size: int, nbs: int, amp_scale: float | None = None):
    import yaml

    hyp = project / f"hyp{nbs}.yaml"
    hyp.write_text(yaml.safe_dump({"nbs": nbs}))
    hook = SparsityHook(0.003, "slim", mode="subgradient")
    before, after = GradProbe(hook, amp_scale), GradProbe(hook)
    gammas = []

    class Gamma(TrainHook):
        def after_backward(self, ctx):
            gammas.append(torch.cat([bn.weight.detach().flatten() for bn in hook.bns]).clone())

    job = tiny_opts(data, project, epochs=1, batch_size=batch_size, hyp=str(hyp),
                    name=f"b{batch_size}n{nbs}a{amp_scale}")
    t = before.owner = Trainer(job.core, [before, hook, after, Gamma()])
    t.fit()
    return before.seen, [a - b for a, b in zip(after.seen, before.seen)], gammas


def test_subgradient_is_the_same_with_accumulation_and_amp(shapes_data, tmp_path):
    """--sr-mode subgradient: s·sign(γ) is added once per optimizer step to the unscaled gradient: 8 steps
    of batch 1 and 2 steps of 4 accumulated batches add the same per step, and a loss scale of 4096
    changes nothing."""
    for batch, nbs in ((1, 1), (1, 4)):
        _, added, gammas = penalty_per_step(shapes_data, tmp_path, batch, nbs)
        assert len(added) == 8 // nbs  # one penalty per optimizer step, not per batch
        for a, g in zip(added, gammas):
            torch.testing.assert_close(a, 0.003 * torch.sign(g), rtol=0, atol=1e-6)  # float32 of g + p - g
    plain, added_plain, _ = penalty_per_step(shapes_data, tmp_path, 4, 4)
    scaled, added_scaled, _ = penalty_per_step(shapes_data, tmp_path, 4, 4, amp_scale=4096.0)
    torch.testing.assert_close(scaled[0], plain[0], rtol=1e-4, atol=1e-7)  # hooks see unscaled grads
    torch.testing.assert_close(added_scaled[0], added_plain[0])


class StepProbe(TrainHook):
    """Records the selected γ and ``ctx.schedule_lr`` in ``after_step``; with ``freeze`` it first zeroes
    the data gradient of the first selected batch norm in ``after_backward`` (place it before the
    sparsity hook) and sets that γ to ``freeze`` at the start."""

    def __init__(self, sparsity: SparsityHook, freeze: torch.Tensor | None = None, amp_scale=None):
        self.sparsity, self.freeze, self.amp_scale, self.owner = sparsity, freeze, amp_scale, None
        self.gammas: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.optimizer_lrs: list[float] = []  # the optimizer's own lr of the batch norms (with owner)

    def on_epoch_start(self, ctx, epoch):
        if epoch == 0 and self.amp_scale:
            self.owner.scaler = torch.amp.GradScaler("cpu", init_scale=self.amp_scale)
        if epoch == 0 and self.freeze is not None:
            self.sparsity.on_epoch_start(ctx, epoch)  # selects the batch norms (idempotent)
            with torch.no_grad():
                self.sparsity.bns[0].weight.copy_(self.freeze)

    def after_backward(self, ctx):
        if self.freeze is not None:
            self.sparsity.bns[0].weight.grad.zero_()

    def after_step(self, ctx):
        self.lrs.append(ctx.schedule_lr)
        if self.owner is not None:
            self.optimizer_lrs.append(self.owner.optimizer.param_groups[0]["lr"])
        self.gammas.append(torch.cat([bn.weight.detach().flatten() for bn in self.sparsity.bns]).clone())


@pytest.mark.parametrize("adam", [True, False])
def test_proximal_step_zeroes_a_gamma_without_data_gradient_in_the_predicted_steps(shapes_data,
                                                                                     tmp_path, adam):
    """γ ← sign(γ)·max(|γ| − η·s, 0) after every step, η = lr0 × the schedule whichever optimizer runs: a
    γ whose data gradient is zero reaches exactly zero at the first step where Σ η·s ≥ |γ₀|, and not
    before, with Adam and with SGD alike."""
    s = 0.5
    hook = SparsityHook(s, "slim")
    n = 4
    start = torch.tensor([0.0004, -0.0015, 0.003, 0.02])
    import yaml

    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(yaml.safe_dump({"nbs": 4, "warmup_epochs": 0.5}))
    job = tiny_opts(shapes_data, tmp_path, epochs=4, batch_size=4, hyp=str(hyp), adam=adam, ema=False,
                    name=f"adam{adam}")
    width = None

    class Freeze(StepProbe):
        def on_epoch_start(self, ctx, epoch):
            nonlocal width
            if epoch == 0:
                self.sparsity.on_epoch_start(ctx, epoch)
                width = self.sparsity.bns[0].num_features
                self.freeze = start.repeat(width // n + 1)[:width]
            super().on_epoch_start(ctx, epoch)

    probe = Freeze(hook)
    probe.owner = Trainer(job.core, [probe, hook, probe_after := StepProbe(hook)])
    probe.owner.fit()
    lrs = torch.tensor(probe_after.lrs, dtype=torch.float64)
    assert len(lrs) == 4 * 2 and 0 < lrs.max() <= 0.01  # 2 steps an epoch; lr0 0.01, warm-up and cosine
    shrink = (lrs * s).cumsum(0)
    frozen = torch.stack([g[:width] for g in probe_after.gammas])[:, :n]  # (steps, n)
    for c, g0 in enumerate(start.tolist()):
        k = int((shrink >= abs(g0) - 1e-7).nonzero()[0]) if shrink[-1] >= abs(g0) else None
        if k is None:
            assert frozen[-1, c] != 0 and frozen[-1, c].sign() == torch.sign(torch.tensor(g0))
            continue
        assert frozen[k, c] == 0 and (frozen[k:, c] == 0).all()
        if k:
            assert abs(frozen[k - 1, c] - (abs(g0) - shrink[k - 1]) * (1 if g0 > 0 else -1)) < 1e-6
    assert (frozen[-1] == 0).sum() == 3  # the three small γ end at zero, 0.02 keeps its sign


def test_proximal_step_is_the_same_with_adam_and_sgd_accumulation_and_amp(shapes_data, tmp_path):
    """One threshold per optimizer step at η·s, whatever the optimizer, the accumulation or the AMP
    loss scale: with the data gradient frozen, the γ sequence depends on the steps' η only."""
    import yaml

    runs = {}
    for adam, batch, nbs, amp in ((True, 4, 4, None), (False, 4, 4, None), (True, 1, 4, None),
                                  (True, 4, 4, 4096.0)):
        hyp = tmp_path / f"hyp{nbs}.yaml"
        hyp.write_text(yaml.safe_dump({"nbs": nbs}))
        hook = SparsityHook(0.5, "slim")
        job = tiny_opts(shapes_data, tmp_path, epochs=2, batch_size=batch, hyp=str(hyp), adam=adam,
                        ema=False, name=f"a{adam}b{batch}n{nbs}s{amp}")
        probe = StepProbe(hook, freeze=torch.tensor(0.002), amp_scale=amp)
        after = StepProbe(hook)
        probe.owner = after.owner = Trainer(job.core, [probe, hook, after])
        probe.owner.fit()
        # η is hyp lr0 × the schedule: SGD's own lr, not Adam's (lr0 × adam_lr_ratio)
        ratio = load_hyp()["adam_lr_ratio"] if adam else 1.0
        assert after.lrs == pytest.approx([lr / ratio for lr in after.optimizer_lrs])
        first = torch.stack([g[:hook.bns[0].num_features] for g in after.gammas])
        runs[(adam, batch, amp)] = (after.lrs, first)
    lrs, gammas = runs[(True, 4, None)]
    for key, (other_lrs, other) in runs.items():
        assert len(other_lrs) == 4, key  # 2 epochs of 2 optimizer steps: one threshold per step, not batch
        expected = (0.002 - 0.5 * torch.tensor(other_lrs, dtype=torch.float64).cumsum(0)).clamp(min=0)
        torch.testing.assert_close(other[:, 0].double(), expected, rtol=0, atol=1e-7, msg=str(key))
        if key[1] == 4:  # same batches: the same η (warm-up counts batches), so the same γ
            assert other_lrs == pytest.approx(lrs), key
            torch.testing.assert_close(other, gammas, rtol=0, atol=1e-7, msg=str(key))
    assert gammas[-1, 0] == 0 and gammas[0, 0] > 0


class InfOnce(TrainHook):
    """Makes the first backward pass give one γ an inf gradient, as an AMP overflow would (during the
    backward, so the loss scaler sees it when it unscales)."""

    def __init__(self, sparsity: SparsityHook):
        self.sparsity, self.done = sparsity, False

    def on_epoch_start(self, ctx, epoch):
        if epoch == 0:
            self.sparsity.bns[0].weight.register_hook(self.overflow)

    def overflow(self, grad):
        if self.done:
            return grad
        self.done = True
        grad = grad.clone()
        grad[0] = float("inf")
        return grad


def test_proximal_step_skips_the_steps_amp_skips(shapes_data, tmp_path):
    hook = SparsityHook(0.5, "slim")
    probe = StepProbe(hook, amp_scale=1024.0)
    after = StepProbe(hook)
    import yaml

    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(yaml.safe_dump({"nbs": 4}))  # an optimizer step every batch: 2 an epoch
    job = tiny_opts(shapes_data, tmp_path, epochs=1, batch_size=4, ema=False, hyp=str(hyp))
    t = probe.owner = Trainer(job.core, [probe, hook, InfOnce(hook), after])
    steps = []
    t_step = t._optimizer_step

    def counted():
        steps.append(t.scaler.get_scale())
        t_step()

    t._optimizer_step = counted
    t.fit()
    assert len(steps) >= 2 and t.scaler.get_scale() < 1024.0  # the first step overflowed and was skipped
    assert len(after.lrs) == len(steps) - 1  # no threshold on the skipped step


def test_proximal_zeros_reach_the_saved_moving_average(shapes_data, tmp_path):
    """With --ema (the default) the checkpoint holds the moving average: a γ the threshold zeroes is zero
    there too, and the logged share is the saved model's."""
    hook = SparsityHook(0.5, "slim")
    probe = StepProbe(hook, freeze=torch.tensor(0.0005))
    job = tiny_opts(shapes_data, tmp_path, epochs=2, batch_size=4, ema=True, name="ema")
    Trainer(job.core, [probe, hook]).fit()
    width = hook.bns[0].num_features
    saved = load_checkpoint(tmp_path / "ema" / "weights" / "last.pt")
    key = next(k for k in saved["model"] if k.startswith(f"layers.{hook.convs[0]}.") and
               k.endswith("bn.weight"))
    assert (saved["model"][key] == 0).all()  # the moving average, not only the live model
    assert (hook.history[-1][1][:width] == 0).all()


class SmallGammas(TrainHook):
    def prepare_model(self, trainer, model):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.04 + 0.005)
        self.start = float((bn_gammas(model).abs() < 0.01).float().mean())
        return model


def test_sparse_training_drives_gammas_to_zero_and_logs_them(shapes_data, tmp_path):
    shares = {}
    for sr in (False, True):
        small = SmallGammas()
        opts = tiny_opts(shapes_data, tmp_path, epochs=3, adam=False, ema=False, sr=sr, s=0.5,
                         prune=1, name=f"sr{sr}")
        t = trainer(opts, [small])
        t.fit()
        shares[sr] = float((bn_gammas(t.model).abs() < 0.01).float().mean())
    per_epoch = [float((g < 0.01).float().mean()) for _, g in t.hooks[0].history]
    assert per_epoch == sorted(per_epoch) and per_epoch[-1] > per_epoch[0]  # rises every epoch
    assert shares[True] > small.start + 0.1
    assert shares[True] > shares[False] + 0.1
    run = tmp_path / "srTrue"
    assert (run / "gamma.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    assert "bn_gamma" in events.Tags()["histograms"]
    assert len(events.Scalars("sparsity/share_below_0.01")) == 3


def test_resume_keeps_the_sparsity_settings(shapes_data, tmp_path):
    opts = tiny_opts(shapes_data, tmp_path, epochs=3, sr=True, s=0.02, prune=2, sr_schedule="local",
                     sr_decay_at=0.3, sr_keep=0.4, sr_rank="layer")
    with pytest.raises(KeyboardInterrupt):
        trainer(opts, [StopAt(2)]).fit()
    t = trainer(resumed(str(tmp_path / "exp" / "weights" / "last.pt")))
    hook = t.hooks[0]
    assert isinstance(hook, SparsityHook)
    assert (hook.s, hook.method.name, hook.schedule, hook.decay_at, hook.keep) == (0.02, "layer", "local",
                                                                                    0.3, 0.4)
    assert (hook.mode, hook.rank) == ("proximal", "layer")
    # a run saved before --sr-mode existed continues with the sub-gradient it started with
    last = tmp_path / "exp" / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["meta"]["opts"]["sr_mode"]
    torch.save(ckpt, last)
    assert resumed(str(last)).sparsity.sr_mode == "subgradient"


def test_bad_sparsity_options_are_one_line_errors():
    with pytest.raises(UserError, match="--s -1"):
        SparsityHook(-1)
    with pytest.raises(UserError, match="--sr-schedule"):
        SparsityHook(0.001, schedule="cosine")
    with pytest.raises(UserError, match="--sr-decay-at"):
        SparsityHook(0.001, decay_at=2)
    with pytest.raises(UserError, match="--sr-rank 'row'"):
        SparsityHook(0.001, rank="row")
    with pytest.raises(UserError, match="--sr-rank layer: only the local schedule"):
        SparsityOptions(sr=True, sr_rank="layer", sr_schedule="global").check()


@pytest.mark.parametrize("cfg", ["yolo-small", "yolov3"])
@pytest.mark.parametrize("name", list(METHODS))
def test_sparse_training_penalizes_exactly_what_the_method_may_cut(cfg, name):
    """``train.py -sr --prune-method M``: the hook penalizes the batch norms of the convs M's plan ranks
    (the candidates its channel masks cover) and of every residual block M may remove."""
    import train as train_script
    from engine.hooks import LossGains, TrainContext
    from prune.methods import plan
    from tests.test_prune import spread_gammas

    job = train_script.parse_args(["-sr", "--prune-method", name])
    hook = job.sparsity.hook()
    model = spread_gammas(Darknet(REPO / "cfg" / f"{cfg}.cfg"))
    ctx = TrainContext(model, torch.device("cpu"), 1, (64, 64, 64), False, LossGains(1, 1, 1), True)
    hook.on_epoch_start(ctx, 0)
    penalized = {i for i, layer in enumerate(model.layers)
                 if any(getattr(layer, "bn", None) is bn for bn in hook.bns)}
    p = plan(model, name, percent=0.5, layer_keep=0.0, shortcuts=1)
    may_cut = set(p.channels.masks) if p.channels else set()
    if METHODS[name].blocks:
        may_cut |= {c for b in residual_blocks(model.cfg) for c in b.convs}
    assert penalized == may_cut and penalized
    # the older tools' spelling selects the same sets as the methods it stands for
    alias = {"normal": "0", "regular": "0", "shortcut": "1", "slim": "1", "layer": "2"}.get(name)
    if alias:
        old = train_script.parse_args(["-sr", "--prune", alias]).sparsity.hook()
        old.on_epoch_start(ctx, 0)
        assert [id(bn) for bn in old.bns] == [id(bn) for bn in hook.bns]
