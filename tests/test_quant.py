"""Quantizers: levels, straight-through gradients, power-of-two scales, DoReFa."""

from __future__ import annotations

import pytest
import torch

import train as train_script
from models.darknet import Darknet
from models.io import load_model, save_checkpoint
from models.layers import ConvBN
from models.quantized.convert import QuantConfig, quantize_model, scale_owners
from models.quantized.modules import ActQuant, QConvBN, QuantSpec
from models.quantized.observers import Observer
from models.quantized.quantizers import (
    Scheme,
    dorefa_activations,
    dorefa_weights,
    fake_quantize,
    integers,
    log2_exact,
    pow2_ceil,
    scale_zero_point,
)
from models.shapes import IMAGE
from tests.conftest import REPO, rel_err, tame_model
from utils.errors import UserError

SCHEMES = [Scheme(b, sym, p2) for b in (2, 4, 8) for sym in (True, False) for p2 in (False, True)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_levels_are_at_most_two_to_the_bits(scheme):
    # symmetric schemes spend levels on both sides alike; give them a range that uses every level
    x = torch.linspace(-5.0 if scheme.symmetric else -3.0, 5.0, 20001)
    scale, zp = scale_zero_point(x.min(), x.max(), scheme)
    q = fake_quantize(x, scale, zp, scheme)
    n = len(torch.unique(q))
    assert n <= 2 ** scheme.bits
    codes = integers(x, scale, zp, scheme)
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax
    if not scheme.pow2:  # the range is covered tightly: (nearly) every level is used
        assert n >= scheme.qmax - scheme.qmin
    assert (fake_quantize(torch.zeros(1), scale, zp, scheme) == 0).all()  # zero is exact
    assert (q - x).abs().max() <= scale / 2 + 1e-6  # nothing clipped inside the observed range


@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(4, symmetric=False)], ids=str)
def test_straight_through_gradient_is_one_inside_and_zero_outside(scheme):
    scale, zp = scale_zero_point(torch.tensor(-1.0), torch.tensor(1.0), scheme)
    x = torch.tensor([-5.0, -0.9, -0.3, 0.0, 0.42, 0.9, 5.0], requires_grad=True)  # ±0.9: inside after the
    # affine zero point is rounded (which shifts the range by up to half a step)
    fake_quantize(x, scale, zp, scheme).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_every_weight_inside_its_own_range_gets_the_gradient(scheme):
    """A weight at its channel's extreme defines the range, so it is on the grid and must train: x / s
    can exceed qmax there by a float rounding error, which must not zero its gradient."""
    torch.manual_seed(0)
    w = (torch.randn(64, 27) * torch.rand(64, 1)).requires_grad_()
    scale, zp = scale_zero_point(w.detach().amin(1), w.detach().amax(1), scheme)
    fake_quantize(w, scale, zp, scheme, axis=0).sum().backward()
    assert (w.grad == 1).all()


def test_power_of_two_scales_are_exact_and_never_smaller():
    s = torch.tensor([1e-5, 0.0123, 0.25, 0.3, 3.0, 1024.0, 1500.0])
    p = pow2_ceil(s)
    assert log2_exact(p) and (p >= s).all() and (p < 2 * s).all()
    assert p[2] == 0.25 and p[5] == 1024.0
    assert not log2_exact(torch.tensor([0.3]))
    lo, hi = -torch.rand(16) * 3, torch.rand(16) * 5  # per channel
    for symmetric in (True, False):
        scale, _ = scale_zero_point(lo, hi, Scheme(8, symmetric, pow2=True))
        assert log2_exact(scale)


def test_per_channel_scales_follow_the_axis():
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 10.0]).view(4, 1, 1, 1)
    lo, hi = w.amin((1, 2, 3)), w.amax((1, 2, 3))
    scale, zp = scale_zero_point(lo, hi, Scheme(8))
    q = fake_quantize(w, scale, zp, Scheme(8), axis=0)
    err = (q - w).abs().amax((1, 2, 3))
    assert (err <= scale / 2 + 1e-9).all()


def test_dorefa_weights_have_two_to_the_k_levels_in_minus_one_one():
    w = torch.randn(64, 32, 3, 3)
    for k in (2, 4, 8):
        q = dorefa_weights(w, k)
        assert len(torch.unique(q)) <= 2 ** k and q.min() >= -1 and q.max() <= 1
    w.requires_grad_(True)
    dorefa_weights(w, 4).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_dorefa_signed_activations_keep_the_negative_side():
    x = torch.tensor([-2.0, -0.45, -0.1, 0.0, 0.3, 0.8, 2.0], requires_grad=True)
    unsigned = dorefa_activations(x, 4)
    signed = dorefa_activations(x, 4, signed=True)
    assert (unsigned[:3] == 0).all()  # the plain version drops leaky-ReLU's negatives
    assert signed[1].item() == pytest.approx(-0.45, abs=1 / 14) and signed[2] < 0 and signed[3] == 0
    assert len(torch.unique(dorefa_activations(torch.linspace(-1, 1, 1001), 3, signed=True))) == 7
    signed.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------- observers
def test_ema_and_minmax_observers_follow_their_formulas():
    ema, mm = Observer("ema", momentum=0.9), Observer("minmax")
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([0.0, 4.0])]
    for b in batches:
        ema(b)
        mm(b)
    lo = (-1.0 * 0.9 + 0.1 * -3.0) * 0.9 + 0.1 * 0.0
    hi = (2.0 * 0.9 + 0.1 * 1.0) * 0.9 + 0.1 * 4.0
    assert ema.lo.item() == pytest.approx(lo) and ema.hi.item() == pytest.approx(hi)
    assert (mm.lo.item(), mm.hi.item()) == (-3.0, 4.0)
    ema.frozen = True
    ema(torch.tensor([-100.0, 100.0]))
    assert ema.hi.item() == pytest.approx(hi)  # frozen: the range no longer moves
    early = Observer("ema")
    early.frozen = True  # frozen before any batch (--freeze-observer-epoch 0)
    early(torch.tensor([-1.0, 2.0]))
    early(torch.tensor([-5.0, 9.0]))
    assert (early.lo.item(), early.hi.item()) == (-1.0, 2.0)  # the first batch set it, then it stayed
    per_channel = Observer("minmax", channels=2)
    per_channel(torch.tensor([[1.0, -2.0], [5.0, 3.0]]))
    assert per_channel.lo.tolist() == [-2.0, 3.0] and per_channel.hi.tolist() == [1.0, 5.0]


def test_percentile_and_mse_clip_outliers_and_mse_beats_minmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g)
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, -20.0])  # a few outliers
    scheme = Scheme(4)
    ranges = {}
    for method in ("minmax", "percentile", "mse"):
        obs = Observer(method, percentile=99.9)
        for chunk in x.split(10_000):
            obs(chunk)
        ranges[method] = obs.calibrated_range(scheme)
    assert ranges["minmax"][1].item() == 40.0
    assert 2.5 < ranges["percentile"][1].item() < 4.0  # the 99.9th percentile of N(0, 1) is 3.1

    def mse(r):
        scale, zp = scale_zero_point(*r, scheme)
        return (fake_quantize(x, scale, zp, scheme) - x).pow(2).mean().item()

    assert ranges["mse"][1].item() < 10.0 and mse(ranges["mse"]) < mse(ranges["minmax"]) / 5


# ---------------------------------------------------------------- quantized conv
def _conv_bn(seed: int = 0, activation: str = "leaky") -> ConvBN:
    from models.cfg import parse_cfg

    cfg = parse_cfg(f"[net]\nwidth=16\nheight=16\nchannels=3\n[convolutional]\nbatch_normalize=1\n"
                    f"filters=8\nsize=3\nstride=1\npad=1\nactivation={activation}\n", "conv.cfg")
    torch.manual_seed(seed)
    layer = ConvBN(cfg.layers[0], 3)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
        layer.bn.running_mean.uniform_(-0.3, 0.3)
        layer.bn.running_var.uniform_(0.5, 2.0)
    return layer


def _input_quant(x: torch.Tensor, spec: QuantSpec) -> ActQuant:
    q = ActQuant(spec.a_scheme)
    q.train()(x)
    return q.eval()


@pytest.mark.parametrize("pow2", [False, True])
def test_folded_qat_conv_in_eval_equals_conv_bn_with_the_same_quantized_weights(pow2):
    x = torch.rand(2, 3, 16, 16)
    for bits, tol in ((16, 1e-3), (8, 0.05)):
        spec = QuantSpec(w_bits=bits, a_bits=bits, pow2=pow2)
        ref = _conv_bn().eval()
        q = QConvBN(_conv_bn(), spec, _input_quant(x, spec), None).eval()
        x_q = q.input_quant[0](x)
        with torch.no_grad():
            got = q(x_q)
            w_f, b_f, _ = q._folded()
            w_q, s_w = q.quantized_weight(w_f, b_f)  # as inference quantizes them (bias codes in int32)
            # the same quantized weights unfolded into the float conv + BN: equal up to the bias step
            ref.conv.weight.copy_(w_q / (ref.bn.weight / torch.sqrt(ref.bn.running_var + ref.bn.eps))
                                  .view(-1, 1, 1, 1))
            same = ref(x_q)
            plain = _conv_bn().eval()(x)
        step = q.input_quant[0].qparams()[0] * s_w  # per output channel
        # the only difference is the bias rounded to its integer grid: at most half a step per channel
        assert ((got - same).abs().amax((0, 2, 3)) <= step / 2 + 1e-5).all()
        assert rel_err(got.numpy(), plain.numpy()) < tol  # and close to the float layer


def test_bias_is_an_integer_multiple_of_input_times_weight_scale():
    x = torch.rand(2, 3, 16, 16)
    for pow2 in (False, True):
        spec = QuantSpec(w_bits=8, a_bits=8, pow2=pow2)
        q = QConvBN(_conv_bn(), spec, _input_quant(x, spec), None).eval()
        w_f, b_f, _ = q._folded()
        _, s_w = q.quantized_weight(w_f, b_f)
        b_q = q.quantized_bias(b_f, s_w)
        s_in = q.input_quant[0].qparams()[0]
        k = b_q / (s_in * s_w)
        assert torch.allclose(k, k.round(), atol=1e-3) and (k.abs() > 0).all()
        if pow2:
            assert log2_exact(s_in) and log2_exact(s_w) and log2_exact(s_in * s_w)


def test_folded_training_forward_matches_conv_bn_on_the_batch():
    """Before BN is frozen, the folded graph reproduces conv + BN with batch statistics (16 bits),
    and it updates the running statistics as BN would."""
    x = torch.randn(4, 3, 16, 16)
    ref = _conv_bn().train()
    q = QConvBN(_conv_bn(), QuantSpec(w_bits=16, a_bits=16), None, None).train()
    y_ref, y_q = ref(x), q(x)
    assert rel_err(y_q.detach().numpy(), y_ref.detach().numpy()) < 1e-3
    torch.testing.assert_close(q.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(q.bn.running_var, ref.bn.running_var)
    # and it back-propagates as conv + BN does: through the batch statistics too, or the weights drift
    # along directions the batch normalization cancels in training and the running statistics do not
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_q * g).sum().backward()
    pairs = ((q.conv.weight, ref.conv.weight), (q.bn.weight, ref.bn.weight), (q.bn.bias, ref.bn.bias))
    for mine, theirs in pairs:
        assert rel_err(mine.grad.numpy(), theirs.grad.numpy()) < 1e-3
    q.freeze_bn()
    mean = q.bn.running_mean.clone()
    q(x)
    assert torch.equal(q.bn.running_mean, mean)  # frozen BN no longer moves


# ---------------------------------------------------------------- whole models
def _quantized(name: str, fpga: bool = False, **spec) -> Darknet:
    model = tame_model(REPO / "cfg" / f"{name}.cfg")
    quantize_model(model, QuantConfig(QuantSpec(**spec), fpga=fpga))
    model.train()
    with torch.no_grad():
        for _ in range(2):  # observe a couple of batches
            model(torch.rand(2, 3, 64, 64))
    return model.eval()


@pytest.mark.parametrize("name", ["yolov3", "yolov4-tiny"])
def test_added_and_concatenated_tensors_share_one_scale(name):
    model = _quantized(name, fpga=True, pow2=True)
    owner, _ = scale_owners(model)

    def quant(j: int) -> ActQuant:
        m = model.input_quant if owner[j] == IMAGE else model.layers[owner[j]]
        return m if isinstance(m, ActQuant) else m.output_quant

    joins = 0
    for b, srcs in zip(model.cfg.layers, model.inputs):
        if b.type == "shortcut" or (b.type == "route" and len(srcs) > 1):
            assert len({id(quant(j)) for j in srcs}) == 1, b.where()
            joins += 1
    assert joins > 0
    for m in model.modules():
        if isinstance(m, ActQuant):
            assert log2_exact(m.qparams()[0])
    assert all(isinstance(m, QConvBN) for m, b in zip(model.layers, model.cfg.layers)
               if b.type == "convolutional")  # fpga: every conv, heads included


@pytest.mark.parametrize("name", ["yolov3-spp", "yolov4-tiny"])
def test_every_conv_reads_integers_on_the_scale_it_claims(name):
    """The graph check: after maxpools, upsamples, route slices and concats, each conv's input is
    still on its producer's grid (integer codes in range), and its weights and bias are integers on
    theirs, so an integer pipeline computes the same thing from stored codes."""
    model = _quantized(name, fpga=True, pow2=True)
    checked = []

    def check(conv: QConvBN, inputs: tuple[torch.Tensor]) -> None:
        inq = conv.input_quant[0]
        s, zp = inq.qparams()
        codes = inputs[0].double() / s.double() + zp.double()
        assert (codes - codes.round()).abs().max() < 1e-3
        assert inq.scheme.qmin <= codes.min().round() and codes.max().round() <= inq.scheme.qmax
        w_f, b_f, _ = conv._folded()
        w_q, s_w = conv.quantized_weight(w_f, b_f)
        w_codes = w_q.double() / s_w.double().view(-1, 1, 1, 1)
        assert (w_codes - w_codes.round()).abs().max() < 1e-4
        b_codes = conv.quantized_bias(b_f, s_w).double() / (s.double() * s_w.double())
        assert (b_codes - b_codes.round()).abs().max() < 1e-3
        checked.append(conv)

    hooks = [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, QConvBN)]
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert len(checked) == sum(b.type == "convolutional" for b in model.cfg.layers)


def test_default_policy_keeps_the_image_and_the_heads_float():
    model = _quantized("yolo-small")
    heads = {model.inputs[h][0] for h in model.heads}
    for i, (m, b) in enumerate(zip(model.layers, model.cfg.layers)):
        if b.type == "convolutional":
            assert isinstance(m, QConvBN) != (i in heads)
    assert model.input_quant is None and model.layers[0].input_quant[0] is None


def test_a_quantized_checkpoint_reloads_with_identical_outputs(tmp_path):
    model = _quantized("yolo-small", w_bits=4, a_bits=4, pow2=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
    save_checkpoint(tmp_path / "q.pt", model)
    again = load_model(tmp_path / "q.pt").eval()
    assert again.quant_config == model.quant_config
    with torch.no_grad():
        assert torch.equal(again(x)[0], before)
    float_model = tame_model(REPO / "cfg" / "yolo-small.cfg").eval()
    with torch.no_grad():
        assert not torch.equal(float_model(x)[0], before)  # it really is quantized


def test_dorefa_activation_quantizers_are_fixed_range_act_quants():
    x = torch.linspace(-2, 2, 4001) + 3.21e-4  # off the exact ties, where x*n and x/(1/n) may round apart
    for bits in (2, 4, 8):
        for signed in (False, True):
            for r in (1.0, 4.0):  # r = 4: the same grid on x/4, scaled back
                spec = QuantSpec("dorefa", bits, bits, bn_fold=False, a_symmetric=signed, a_range=r)
                q = spec.activation_quant().train()
                got = q(x * r)  # training: a fixed observer still does not move
                torch.testing.assert_close(got, r * dorefa_activations(x, bits, signed), atol=1e-5, rtol=0)
                assert tuple(v.item() for v in q.range()) == ((-r if signed else 0.0), r)
    with pytest.raises(ValueError, match="BN folding"):
        QuantSpec("dorefa", bn_fold=True)
    with pytest.raises(ValueError, match="power-of-two"):
        QuantSpec("dorefa", bn_fold=False, pow2=True)


# ---------------------------------------------------------------- training
def test_qat_trains_and_its_checkpoint_is_read_by_test_and_detect(shapes_data, tmp_path):
    import detect as detect_script
    import test as test_script
    from stages.train import trainer
    from tests.test_train import tiny_opts

    opts = tiny_opts(shapes_data, tmp_path, epochs=2, quantized="google", bn_fold=True, fpga=True,
                     freeze_bn_epoch=1, freeze_observer_epoch=1)
    trainer(opts).fit()
    last = tmp_path / "exp" / "weights" / "last.pt"
    model = load_model(last)
    assert model.quant_config.spec.pow2 and model.quant_config.spec.bn_fold
    assert any(isinstance(m, QConvBN) for m in model.modules())
    r = test_script.main(["--weights", str(last), "--data", str(shapes_data), "--img-size", "64",
                          "--project", str(tmp_path / "t"), "--workers", "0"])
    assert 0.0 <= r.map50 <= 1.0
    images = shapes_data.parent / "images" / "val"
    summary = detect_script.main(["--weights", str(last), "--source", str(images), "--img-size", "64",
                                  "--output", str(tmp_path / "d")])
    assert summary.frames == len(list(images.glob("*.jpg"))) == len(summary.written)


def test_quantization_flags():
    opts = train_script.parse_args(["--quantized", "1", "--w-bit", "4", "--a-bit", "8", "--BN_Fold",
                                    "--FPGA", "--freeze-bn-epoch", "3"]).quant
    got = (opts.quantized, opts.w_bit, opts.bn_fold, opts.fpga, opts.freeze_bn_epoch)
    assert got == ("1", 4, True, True, 3)
    from quant.hook import hook_from_options, method_name

    assert method_name("2") == "dorefa" and method_name("google") == "google"
    with pytest.raises(UserError, match="--quantized 'int8'"):
        method_name("int8")
    with pytest.raises(UserError, match="--w-bit 9"):
        hook_from_options(train_script.parse_args(["--quantized", "google", "--w-bit", "9"]).quant)
    with pytest.raises(UserError, match=r"--quantized dorefa .*--BN_Fold: DoReFa"):
        hook_from_options(train_script.parse_args(["--quantized", "dorefa", "--BN_Fold"]).quant)
    spec = train_script.parse_args(["--quantized", "google", "--a-symmetric"]).quant.hook().config.spec
    assert spec.a_symmetric and spec.a_scheme.qmin == -127
    config = train_script.parse_args(["--quantized", "google", "--int8-target", "ort"]).quant.hook().config
    assert config.target == "ort" and not config.spec.a_symmetric
    for flags, named in ((["--a-symmetric"], "--int8-target ort --a-symmetric"),
                         (["--FPGA"], "--int8-target ort: needs the google method without --FPGA")):
        with pytest.raises(UserError, match=named):
            train_script.parse_args(["--quantized", "google", "--int8-target", "ort", *flags]).quant.hook()
    with pytest.raises(UserError, match="dorefa"):
        train_script.parse_args(["--quantized", "dorefa", "--int8-target", "ort"]).quant.hook()
    spec = train_script.parse_args(["--quantized", "2", "--dorefa-range", "4"]).quant.hook().config.spec
    assert spec.a_symmetric and spec.a_range == 4.0  # DoReFa keeps leaky negatives


@pytest.fixture(scope="module")
def float_pt(shapes_data, tmp_path_factory):
    from stages.train import trainer
    from tests.test_train import tiny_opts

    project = tmp_path_factory.mktemp("float")
    trainer(tiny_opts(shapes_data, project, epochs=1, notest=True)).fit()
    return project / "exp" / "weights" / "last.pt"


@pytest.mark.parametrize("calib", ["minmax", "percentile", "mse", "mse-symmetric"])
def test_ptq_calibrates_and_the_error_falls_with_more_bits(shapes_data, float_pt, tmp_path, calib):
    from quant import ptq

    calib, *symmetric = calib.split("-")

    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = load_model(float_pt).eval()(x)[1]
    errors = {}
    for bits in (4, 8, 16):
        out = tmp_path / f"{calib}{bits}"
        ptq.main(["--weights", str(float_pt), "--data", str(shapes_data), "--w-bit", str(bits),
                  "--a-bit", str(bits), "--calib", calib, "--images", "8", "--batch-size", "4",
                  "--img-size", "64", "--output", str(out), *(["--a-symmetric"] if symmetric else [])])
        model = load_model(out / "quantized.pt").eval()
        assert model.quant_config.observer == calib
        assert model.quant_config.spec.a_symmetric == bool(symmetric)
        with torch.no_grad():
            got = model(x)[1]
        errors[bits] = max(rel_err(g.numpy(), r.numpy()) for g, r in zip(got, ref))
    assert errors[16] < errors[8] < errors[4], errors
    assert errors[8] < 0.1, errors


def test_ptq_refuses_bad_input(shapes_data, float_pt, tmp_path):
    from quant import ptq

    with pytest.raises(UserError, match="--w-bit 9"):
        ptq.main(["--weights", str(float_pt), "--data", str(shapes_data), "--w-bit", "9",
                  "--output", str(tmp_path / "x")])
    ptq.main(["--weights", str(float_pt), "--data", str(shapes_data), "--images", "4", "--batch-size", "4",
              "--img-size", "64", "--output", str(tmp_path / "q")])
    with pytest.raises(UserError, match="already quantized"):
        ptq.main(["--weights", str(tmp_path / "q" / "quantized.pt"), "--data", str(shapes_data)])
    with pytest.raises(UserError, match="--int8-target ort --a-symmetric"):
        ptq.main(["--weights", str(float_pt), "--data", str(shapes_data), "--int8-target", "ort",
                  "--a-symmetric", "--output", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()


def test_a_shared_scale_clips_none_of_the_joined_tensors():
    """Each producer is a site with its own observer and the scale covers their union: neither of two
    tensors of different ranges is clipped (one EMA observer fed by both would settle between them
    and clip the wider one)."""
    q = ActQuant(Scheme(4, symmetric=False))
    a_site, b_site = q.claim_site(), q.claim_site()
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1000, generator=g)  # [0, 1]
    b = torch.rand(1000, generator=g) * 5 - 1  # [-1, 4]
    q.train()
    for _ in range(50):
        q(a, a_site)
        q(b, b_site)
    scale, zp = q.qparams()
    for t in (a, b):
        assert (fake_quantize(t, scale, zp, q.scheme) - t).abs().max() <= scale * 0.5001  # float slack
    lo, hi = q.range()
    assert lo.item() == pytest.approx(b.min().item()) and hi.item() == pytest.approx(b.max().item())


def test_qat_from_a_ptq_checkpoint_keeps_its_calibrated_ranges(shapes_data, float_pt, tmp_path):
    from quant import ptq
    from stages.train import trainer
    from tests.test_train import tiny_opts

    out = tmp_path / "ptq"
    ptq.main(["--weights", str(float_pt), "--data", str(shapes_data), "--w-bit", "4", "--a-bit", "4",
              "--calib", "mse", "--images", "8", "--batch-size", "4", "--img-size", "64", "--FPGA",
              "--output", str(out)])

    def ranges(path) -> list[tuple[float, float]]:
        quants = [q for q in load_model(path).modules() if isinstance(q, ActQuant)]
        return [(q.range()[0].item(), q.range()[1].item()) for q in quants]

    before = ranges(out / "quantized.pt")
    opts = tiny_opts(shapes_data, tmp_path, epochs=1, weights=str(out / "quantized.pt"), quantized="google",
                     w_bit=4, a_bit=4, bn_fold=True, fpga=True, notest=True, ema=False)
    trainer(opts).fit()
    last = tmp_path / "exp" / "weights" / "last.pt"
    assert ranges(last) == before  # not overwritten by batch extremes
    assert load_model(last).quant_config.observer == "mse"
