"""Knowledge distillation: the terms, the stride matching, and the hook inside real training runs."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import train as train_script
from distill.hook import STRATEGIES, DistillHook
from distill.hook import DistillOptions as DistillOptionsFor
from distill.losses import (
    adapted_l2,
    attention_kl,
    bounded_box_l2,
    box_imitation_l2,
    class_bernoulli_kl,
    class_kl,
    object_mask,
    objectness_kl,
)
from distill.matching import feature_taps, match_features, match_heads
from engine.trainer import Trainer
from models.darknet import Darknet
from models.io import load_model, save_checkpoint, with_classes
from prune.cli import apply_method
from stages.train import trainer
from tests.conftest import REPO
from tests.test_train import tiny_opts
from utils.errors import UserError

SMALL = REPO / "cfg" / "yolo-small.cfg"


# ---------------------------------------------------------------- the terms
def test_object_mask_covers_exactly_the_cells_of_the_boxes():
    # image 0: a box from x 0.25..0.5, y 0.25..0.75; image 1: a box whose edges fall inside cells
    targets = torch.tensor([[0, 2, 0.375, 0.5, 0.25, 0.5],
                            [1, 0, 0.1, 0.1, 0.1, 0.05]])
    m8 = object_mask(targets, 3, 8, 8)
    expect = torch.zeros(3, 8, 8, dtype=torch.bool)
    expect[0, 2:6, 2:4] = True  # x 2..4 and y 2..6 grid units: columns 2, 3 and rows 2..5
    expect[1, 0, 0:2] = True  # x 0.4..1.2 → columns 0, 1; y 0.6..1.0 ends where row 1 starts → row 0
    assert torch.equal(m8, expect)
    # the same boxes on a coarser grid of another stride, and a non-square one
    m4 = object_mask(targets, 3, 4, 2)
    expect = torch.zeros(3, 4, 2, dtype=torch.bool)
    expect[0, 1:3, 0] = True  # x 0.5..1.0 → column 0; y 1..3 → rows 1, 2
    expect[1, 0, 0] = True
    assert torch.equal(m4, expect)
    assert not m8[2].any()  # an image without boxes has no cell


def _head_map(seed: int, classes: int = 4) -> torch.Tensor:
    return torch.randn(2, 3, 5, 5, 5 + classes, generator=torch.Generator().manual_seed(seed))


def test_output_terms_vanish_when_the_student_equals_the_teacher():
    head = Darknet(SMALL).yolo_heads[0]
    head.classes = 4
    t = _head_map(0)
    assert class_kl(head, t.clone(), t, 3.0).abs() < 1e-6
    assert objectness_kl(head, t.clone(), t).abs() < 1e-6
    assert class_bernoulli_kl(head, t.clone(), t).abs() < 1e-6
    s = _head_map(1)
    assert class_kl(head, s, t, 3.0) > 1e-3 and objectness_kl(head, s, t) > 1e-3
    assert class_bernoulli_kl(head, s, t) > 1e-3


def test_class_bernoulli_kl_is_the_per_class_sigmoid_kl_weighted_by_the_teachers_objectness():
    """Two cells, by hand: the term is the objectness-weighted mean of each cell's per-class Bernoulli
    KL; adding the same constant to every class logit, which a softmax ignores, counts here."""
    head = Darknet(SMALL).yolo_heads[0]
    head.classes = 2
    t, s = torch.zeros(1, 1, 1, 2, 7), torch.zeros(1, 1, 1, 2, 7)
    t[..., 4] = torch.tensor([2.0, -1.0])
    t[0, 0, 0, :, 5:] = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    s[0, 0, 0, :, 5:] = torch.tensor([[0.0, 0.0], [-1.0, 2.0]])

    def bern_kl(zt, zs):
        q, p = torch.sigmoid(zt), torch.sigmoid(zs)
        return (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).mean()

    w = torch.sigmoid(torch.tensor([2.0, -1.0]))
    cells = torch.stack([bern_kl(t[0, 0, 0, k, 5:], s[0, 0, 0, k, 5:]) for k in range(2)])
    expect = (w * cells).sum() / w.sum()
    assert class_bernoulli_kl(head, s, t).item() == pytest.approx(expect.item(), rel=1e-5)
    shifted = t.clone()
    shifted[..., 5:] += 2.0
    assert class_kl(head, shifted, t, 1.0).abs() < 1e-6
    assert class_bernoulli_kl(head, shifted, t) > 0.05


def test_adapted_l2_is_the_masked_error_in_units_of_the_teachers_variance():
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(2, 8, 6, 6, generator=g) * 3 + 5
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[0, 1:3, 2:5] = True
    mask[1, 4, 4] = True
    assert adapted_l2(ft.clone(), ft, mask).abs() < 1e-6
    # by hand: the mean over 7 masked cells and 8 channels of the squared error, over the mean variance
    fa = ft + torch.randn(ft.shape, generator=g)
    cells = (fa - ft).pow(2).permute(0, 2, 3, 1)[mask]  # (7, 8)
    expect = cells.mean() / ft.var((0, 2, 3)).mean()
    assert adapted_l2(fa, ft, mask).item() == pytest.approx(expect.item(), rel=1e-5)
    # predicting each channel's mean everywhere scores about 1
    mean = ft.mean((0, 2, 3), keepdim=True).expand_as(ft).clone()
    assert 0.5 < adapted_l2(mean, ft, torch.ones_like(mask)).item() < 1.5
    # a relative error: scaling both maps changes nothing
    scaled = adapted_l2(fa * 10, ft * 10, mask).item()
    assert scaled == pytest.approx(adapted_l2(fa, ft, mask).item(), rel=1e-5)
    # cells outside the mask do not count; an empty mask gives zero
    changed = fa.clone()
    changed[1, :, 0, 0] += 100
    assert adapted_l2(changed, ft, mask).item() == pytest.approx(adapted_l2(fa, ft, mask).item(), rel=1e-6)
    assert adapted_l2(fa, ft, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        adapted_l2(fa[:, :4], ft, mask)


def test_class_kl_is_the_tempered_kl_per_class():
    """One object cell (teacher objectness ~1), the rest background (~0): the term is
    T²/C · KL(softmax(z_t/T) ‖ softmax(z_s/T)) of that cell, computed here by hand."""
    head = Darknet(SMALL).yolo_heads[0]
    head.classes = 2
    t, s = torch.zeros(1, 1, 1, 2, 7), torch.zeros(1, 1, 1, 2, 7)
    t[..., 4] = torch.tensor([30.0, -30.0])
    t[0, 0, 0, 0, 5:] = torch.tensor([3.0, 0.0])
    s[0, 0, 0, 0, 5:] = torch.tensor([0.0, 3.0])
    temp = 2.0
    pt = torch.softmax(torch.tensor([1.5, 0.0]), 0)
    ps = torch.softmax(torch.tensor([0.0, 1.5]), 0)
    expect = temp ** 2 / 2 * (pt * (pt / ps).log()).sum()
    assert class_kl(head, s, t, temp).item() == pytest.approx(expect.item(), rel=1e-5)


def test_class_kl_follows_the_teachers_objectness():
    """Cells the teacher calls background hardly count: changing the student's classes there moves
    the term far less than changing them where the teacher sees an object."""
    head = Darknet(SMALL).yolo_heads[0]
    head.classes = 4
    t = _head_map(0)
    t[..., 4] = -12.0
    t[0, 0, 0, 0, 4] = 12.0  # one object cell
    base = class_kl(head, t.clone(), t, 1.0)
    at_object, at_background = t.clone(), t.clone()
    at_object[0, 0, 0, 0, 5:] = t[0, 0, 0, 0, 5:].flip(0) * 3
    at_background[0, 0, 1, 1, 5:] = t[0, 0, 1, 1, 5:].flip(0) * 3
    assert class_kl(head, at_object, t, 1.0) - base > 1e3 * (class_kl(head, at_background, t, 1.0) - base)


def test_teacher_bound_counts_only_where_the_student_is_worse():
    gt = torch.zeros(3, 4)
    rt = torch.tensor([[0.1, 0, 0, 0], [0.1, 0, 0, 0], [0.5, 0, 0, 0]])
    rs = torch.tensor([[0.3, 0, 0, 0], [0.05, 0, 0, 0], [0.4, 0, 0, 0]])
    # only row 0 is worse than the teacher: 0.09 / 3 rows
    assert bounded_box_l2(rs, rt, gt, 0.0).item() == pytest.approx(0.09 / 3)
    # a margin of 0.1 also counts row 2 (0.16 + 0.1 > 0.25) but not row 1 (0.0025 + 0.1 < 0.01 is false)
    assert bounded_box_l2(rs, rt, gt, 0.1).item() == pytest.approx((0.09 + 0.0025 + 0.16) / 3)
    assert box_imitation_l2(rs, rt).item() == pytest.approx((0.04 + 0.0025 + 0.01) / 3)
    assert bounded_box_l2(rs[:0], rt[:0], gt[:0], 0.0).item() == 0.0


def test_attention_kl_compares_any_channel_counts_and_honours_the_mask():
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(2, 32, 6, 6, generator=g)
    fs = torch.randn(2, 8, 6, 6, generator=g)
    assert attention_kl(ft, ft, 1.0).abs() < 1e-6
    # the attention map is a channel mean of |F|: repeating channels changes nothing
    assert attention_kl(ft.repeat(1, 2, 1, 1), ft, 1.0).abs() < 1e-6
    assert attention_kl(fs, ft, 1.0) > 1e-3
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, 1:3, 2:5] = True
    inside = attention_kl(fs, ft, 1.0, mask)
    changed = fs.clone()
    changed[:, :, 4:, :] *= 5  # rows outside the mask
    assert attention_kl(changed, ft, 1.0, mask).item() == pytest.approx(inside.item(), rel=1e-5)
    changed[:, :, 1, 2] *= 5  # a cell inside it
    assert attention_kl(changed, ft, 1.0, mask).item() != pytest.approx(inside.item(), rel=1e-3)
    assert attention_kl(fs, ft, 1.0, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- matching
def test_features_are_matched_by_stride_for_pruned_students(spread_small):
    teacher = spread_small()
    channel, _ = apply_method(spread_small(), "slim", 0.5)
    layer, _ = apply_method(spread_small(), "layer", shortcuts=2)
    assert len(layer.layers) < len(teacher.layers)
    t_taps = feature_taps(teacher)
    for student in (channel, layer):
        pairs = match_features(student, teacher)
        assert [(s.stride, t.layer) for s, t in pairs] == [(t.stride, t.layer) for t in t_taps]
        x = torch.rand(1, 3, 64, 64)
        sizes = {}
        for s, _ in pairs:
            student.layers[s.layer].register_forward_hook(
                lambda m, a, o, k=s.layer, sizes=sizes: sizes.__setitem__(k, o.shape[-1]))
        student.eval()(x)
        for s, _ in pairs:  # the tapped layer really is at the stride it claims
            assert sizes[s.layer] == 64 / s.stride
        assert match_heads(student, teacher, "t.pt") == [0, 1]


def test_heads_without_a_partner_are_an_error():
    student = Darknet(with_classes(Darknet(REPO / "cfg" / "yolov3.cfg").cfg, 6))
    with pytest.raises(UserError, match="stride 8"):
        match_heads(student, Darknet(SMALL), "small.pt")


# ---------------------------------------------------------------- inside training
@pytest.fixture(scope="module")
def spread_small():
    from tests.test_prune import spread_gammas

    base = spread_gammas(Darknet(SMALL))

    def get() -> Darknet:
        model = Darknet(base.cfg)
        model.load_state_dict(base.state_dict())
        return model.eval()
    return get


@pytest.fixture(scope="module")
def teacher_pt(shapes_data, tmp_path_factory):
    """A yolo-small teacher after one tiny training epoch."""
    project = tmp_path_factory.mktemp("teacher")
    trainer(tiny_opts(shapes_data, project, epochs=1, notest=True)).fit()
    return project / "exp" / "weights" / "last.pt"


def _one_step(t: Trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One real batch through the trainer's model, loss and hooks, then backward and a step."""
    imgs, targets, _, _ = next(iter(t.train_loader))
    imgs = imgs.float() / 255
    t.model.train()
    preds = t.model(imgs)
    out = t.loss_fn(preds, targets, tuple(imgs.shape[2:]))
    extras = {}
    for h in t.hooks:
        extras.update(h.extra_losses(t.ctx, imgs, targets, preds, out))
    loss = out.total + sum(extras.values())
    loss.backward()
    return loss, extras


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_trains_the_student_only(shapes_data, teacher_pt, tmp_path, strategy):
    t = trainer(tiny_opts(shapes_data, tmp_path, weights=str(teacher_pt), kd_str=strategy,
                          t_weights=str(teacher_pt)))
    t.setup()
    hook = next(h for h in t.hooks if isinstance(h, DistillHook))
    teacher = hook.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss, extras = _one_step(t)
    assert torch.isfinite(loss)
    expect = {f"kd_{t.split('_')[0]}" for t in STRATEGIES[strategy]}
    assert set(extras) == expect
    assert all(torch.isfinite(v) and v.requires_grad for v in extras.values())
    # the student starts as a copy of the teacher, so output terms start near zero; not exactly,
    # because the trainer's student is in train mode (batch statistics) and the teacher in eval
    assert sum(v.item() for v in extras.values()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.parameters())
    optimized = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    t._optimizer_step()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training


@pytest.mark.parametrize("method", ["slim", "layer"])
@pytest.mark.parametrize("strategy", [4, 5])
def test_feature_strategies_distill_into_pruned_students(shapes_data, teacher_pt, tmp_path, method, strategy):
    student, _ = apply_method(load_model(teacher_pt), method, 0.5, shortcuts=2)
    student_pt = tmp_path / "student.pt"
    save_checkpoint(student_pt, student)
    trainer(tiny_opts(shapes_data, tmp_path, epochs=1, weights=str(student_pt), kd_str=strategy,
                      t_weights=str(teacher_pt))).fit()
    run = tmp_path / "exp"
    rows = list(csv.DictReader((run / "results.csv").open()))
    feat = float(rows[0]["train/kd_feat"])
    assert math.isfinite(feat) and feat > 0
    assert math.isfinite(float(rows[0]["train/kd_box"])) and math.isfinite(float(rows[0]["train/kd_cls"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    assert events.Scalars("train/kd_feat")[0].value == pytest.approx(feat, rel=1e-6)
    assert {"train/box", "train/kd_box", "train/kd_cls"} <= set(events.Tags()["scalars"])


def test_a_teacher_with_other_classes_is_refused(shapes_data, tmp_path):
    teacher = Darknet(with_classes(Darknet(SMALL).cfg, 3))
    save_checkpoint(tmp_path / "t3.pt", teacher)
    with pytest.raises(UserError, match="teacher predicts 3 classes, the student 6"):
        trainer(tiny_opts(shapes_data, tmp_path, kd_str=1, t_weights=str(tmp_path / "t3.pt"))).setup()


def test_distillation_flags(shapes_data, tmp_path, teacher_pt):
    opts = train_script.parse_args(["--KDstr", "5", "--t_weights", "t.pt", "--kd-t", "2",
                                    "--kd-feat", "0.5"]).distill
    assert (opts.kd_str, opts.t_weights, opts.kd_t, opts.kd_feat) == (5, "t.pt", 2.0, 0.5)
    assert train_script.parse_args(["--t_weights", "t.pt"]).distill.kd_str == 1  # the older tools' default
    with pytest.raises(UserError, match="needs a teacher"):
        trainer(tiny_opts(shapes_data, tmp_path, kd_str=2)).setup()
    with pytest.raises(UserError, match="darknet weights need the teacher's --t_cfg"):
        trainer(tiny_opts(shapes_data, tmp_path, kd_str=2, t_weights="yolov3.weights")).setup()
    with pytest.raises(SystemExit):
        train_script.parse_args(["--KDstr", "7"])


# ---------------------------------------------------------------- strategy 6: the adaptation layer
@pytest.fixture(scope="module")
def slim_student_pt(teacher_pt, tmp_path_factory):
    """The teacher slim-pruned by half: narrower feature maps than the teacher's."""
    student, _ = apply_method(load_model(teacher_pt), "slim", 0.5, shortcuts=2)
    path = tmp_path_factory.mktemp("student") / "student.pt"
    save_checkpoint(path, student)
    return path


def test_strategy_6_trains_its_adaptation_convs_outside_the_student(shapes_data, teacher_pt, slim_student_pt,
                                                                    tmp_path):
    t = trainer(tiny_opts(shapes_data, tmp_path, weights=str(slim_student_pt), kd_str=6,
                          t_weights=str(teacher_pt), kd_warmup=0))
    t.setup()
    hook = next(h for h in t.hooks if isinstance(h, DistillHook))
    student_shapes = {k: v.shape for k, v in t.model.state_dict().items()}
    assert len(hook.adapters) == len(hook.feat_pairs) > 0
    from models.shapes import infer_shapes

    s_shapes, t_shapes = infer_shapes(t.model.cfg), infer_shapes(hook.teacher.cfg)
    for conv, (s, tt) in zip(hook.adapters, hook.feat_pairs):  # student width → teacher width
        assert (conv.in_channels, conv.out_channels) == (s_shapes[s.layer].c, t_shapes[tt.layer].c)
        assert conv.in_channels < conv.out_channels
    adapter_ids = {id(p) for p in hook.adapters.parameters()}
    optimized = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert adapter_ids <= optimized
    assert not adapter_ids & {id(p) for p in t.model.parameters()}
    _, extras = _one_step(t)
    assert extras["kd_feat"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hook.adapters.parameters())
    before = [p.detach().clone() for p in hook.adapters.parameters()]
    t._optimizer_step()
    assert all(not torch.equal(b, p) for b, p in zip(before, hook.adapters.parameters()))
    assert {k: v.shape for k, v in t.model.state_dict().items()} == student_shapes


def test_strategy_6_leaves_the_saved_and_exported_student_as_without_distillation(
        shapes_data, teacher_pt, slim_student_pt, tmp_path):
    import export as export_script

    runs = {}
    for name, kd in (("plain", {}), ("kd6", {"kd_str": 6, "t_weights": str(teacher_pt)})):
        trainer(tiny_opts(shapes_data, tmp_path, name=name, epochs=1, notest=True,
                          weights=str(slim_student_pt), **kd)).fit()
        runs[name] = tmp_path / name / "weights" / "last.pt"
    plain, kd6 = (torch.load(runs[n], weights_only=False) for n in ("plain", "kd6"))
    assert kd6["cfg"] == plain["cfg"]
    assert {k: v.shape for k, v in kd6["model"].items()} == {k: v.shape for k, v in plain["model"].items()}
    # the adaptation convs travel only in the training state, for a resume
    assert set(kd6["meta"]["train_state"]["hooks"]["DistillHook"]["adapters"]) == {"0.weight", "0.bias",
                                                                                   "1.weight", "1.bias"}
    assert plain["meta"]["train_state"]["hooks"] == {}
    exported = {}
    for name, pt in runs.items():
        outs = export_script.main(["--weights", str(pt), "--include", "weights", "--img-size", "64"])
        exported[name] = {p.suffix: p for p in outs}
    assert exported["kd6"][".cfg"].read_bytes() == exported["plain"][".cfg"].read_bytes()
    assert exported["kd6"][".weights"].stat().st_size == exported["plain"][".weights"].stat().st_size


def test_strategy_6_terms_vanish_when_the_student_equals_the_teacher(shapes_data, teacher_pt, tmp_path):
    """The student is the teacher with its batch norms in inference mode: the adaptation convs fitted on
    the first batch reproduce the teacher's features, and every term is zero up to float error from BN
    folding (the fit need not be the identity: a tiny teacher has dead, collinear channels)."""
    t = trainer(tiny_opts(shapes_data, tmp_path, weights=str(teacher_pt), kd_str=6,
                          t_weights=str(teacher_pt), kd_warmup=0))
    t.setup()
    hook = next(h for h in t.hooks if isinstance(h, DistillHook))
    imgs, targets, _, _ = next(iter(t.train_loader))
    imgs = imgs.float() / 255
    t.model.train()
    for m in t.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    preds = t.model(imgs)
    out = t.loss_fn(preds, targets, tuple(imgs.shape[2:]))
    extras = hook.extra_losses(t.ctx, imgs, targets, preds, out)
    assert set(extras) == {"kd_box", "kd_cls", "kd_obj", "kd_feat"}
    assert len(out.positives[0].b) > 0 and targets[:, 0].eq(0).any()  # boxes, so the mask is not empty
    assert all(abs(v.item()) < 1e-5 for v in extras.values()), extras


def test_least_squares_fit_recovers_a_linear_map_between_feature_maps():
    from distill.hook import fit_least_squares

    g = torch.Generator().manual_seed(0)
    fs = torch.randn(4, 6, 5, 5, generator=g)
    truth = torch.nn.Conv2d(6, 10, 1)
    ft = truth(fs).detach()
    conv = torch.nn.Conv2d(6, 10, 1)
    mask = torch.ones(4, 5, 5, dtype=torch.bool)
    assert adapted_l2(conv(fs), ft, mask) > 0.1
    fit_least_squares(conv, fs, ft)
    assert torch.allclose(conv.weight, truth.weight, atol=1e-4)
    assert torch.allclose(conv.bias, truth.bias, atol=1e-4)
    # with noise the fit is the best linear map: any other does worse on the batch it was fitted on
    noisy = ft + torch.randn(ft.shape, generator=g)
    fit_least_squares(conv, fs, noisy)
    best = adapted_l2(conv(fs), noisy, mask)
    with torch.no_grad():
        conv.weight += 0.01 * torch.randn(conv.weight.shape, generator=g)
    assert adapted_l2(conv(fs), noisy, mask) > best


def test_strategy_6_adaptation_convs_are_the_same_on_both_ddp_ranks(shapes_data, teacher_pt, tmp_path):
    from tests.test_train import run_two_ranks

    a, b = run_two_ranks(tmp_path, (
        "from stages.train import trainer\n"
        "from tests.test_train import tiny_opts\n"
        f"t = trainer(tiny_opts({str(shapes_data)!r}, {str(tmp_path)!r}, epochs=1, notest=True, device='cpu',"
        f" weights={str(teacher_pt)!r}, kd_str=6, t_weights={str(teacher_pt)!r}, kd_warmup=0))\n"
        "t.fit()\n"
        "hook = next(h for h in t.hooks if h.parameters())\n"
        "saved = {'model': t.model.state_dict(), 'adapters': hook.adapters.state_dict()}\n"), port=29534)
    for part in ("model", "adapters"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_strategy_6_resume_restores_the_adaptation_convs(shapes_data, teacher_pt, slim_student_pt, tmp_path):
    from stages.train import resumed
    from tests.test_train import StopAt

    kd = dict(epochs=2, notest=True, weights=str(slim_student_pt), kd_str=6, t_weights=str(teacher_pt))
    full = trainer(tiny_opts(shapes_data, tmp_path, name="full", **kd))
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny_opts(shapes_data, tmp_path, name="cut", **kd), [StopAt(1)]).fit()
    last = tmp_path / "cut" / "weights" / "last.pt"
    cut = trainer(resumed(str(last)))
    cut.fit()
    adapters = lambda t: next(h for h in t.hooks if isinstance(h, DistillHook)).adapters.state_dict()  # noqa: E731
    a, b = adapters(full), adapters(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    after = torch.load(last, weights_only=True)["model"]
    expect = torch.load(tmp_path / "full" / "weights" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(expect[k], after[k]) for k in expect)


def test_strategy_6_feature_weight_ramps_up_over_the_warmup_epochs():
    from engine.hooks import LossGains, TrainContext

    hook = DistillHook(DistillOptionsFor(kd_str=6, t_weights="t.pt", kd_warmup=2.0))
    ctx = TrainContext(torch.nn.Identity(), torch.device("cpu"), 4, (64, 64, 64), False,
                       LossGains(1, 1, 1), True, batches=10)
    ramp = {}
    for epoch, batch in ((0, 0), (0, 5), (1, 0), (1, 5), (3, 0)):
        hook._progress = (epoch, batch)
        ramp[epoch, batch] = hook.feature_ramp(ctx)
    assert ramp == {(0, 0): 0.0, (0, 5): 0.25, (1, 0): 0.5, (1, 5): 0.75, (3, 0): 1.0}
    hook.opts.kd_warmup = 0
    assert hook.feature_ramp(ctx) == 1.0
