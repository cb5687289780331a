"""Every script's command line: numeric flags take a bounded type, and a bad value, an unknown flag or a
missing argument is one line on stderr with exit status 2, before anything is loaded or written."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest

import compress
import detect
import export
import summary
import test as test_script
import train
from bench import all as bench_all
from bench import capacity as bench_capacity
from bench import distill as bench_distill
from bench import int8_latency, latency_opencv, prune_methods, train_speed
from bench import quant as bench_quant
from bench import sparsity as bench_sparsity
from bench import speed as bench_speed
from prune import cli as prune_cli
from prune.methods import METHODS
from quant import ptq
from tests.conftest import REPO
from utils import anchors, synthetic
from utils.cli import Bounded

W = ["--weights", "x.pt"]
# script -> (parser factory, the required arguments it needs besides the flag under test)
PARSERS = {
    "train.py": (train.build_parser, []),
    "test.py": (test_script.build_parser, W),
    "detect.py": (detect.build_parser, [*W, "--source", "x.jpg"]),
    "export.py": (export.build_parser, W),
    "compress.py": (compress.build_parser, []),
    "summary.py": (summary.build_parser, []),
    **{f"prune/{m}_prune.py": (functools.partial(prune_cli.build_parser, m), W) for m in METHODS},
    "quant/ptq.py": (ptq.build_parser, [*W, "--data", "x.data"]),
    "utils/synthetic.py": (synthetic.build_parser, []),
    "utils/anchors.py": (anchors.build_parser, ["--data", "x.data", "--cfg", "x.cfg"]),
    "bench/all.py": (bench_all.build_parser, []),
    "bench/capacity.py": (bench_capacity.build_parser, []),
    "bench/distill.py": (bench_distill.build_parser, ["--student", "s.pt", "--teacher", "t.pt"]),
    "bench/int8_latency.py": (int8_latency.build_parser, []),
    "bench/latency_opencv.py": (latency_opencv.build_parser, []),
    "bench/prune_methods.py": (prune_methods.build_parser, []),
    "bench/quant.py": (bench_quant.build_parser, W),
    "bench/train_speed.py": (train_speed.build_parser, []),
    "bench/sparsity.py": (bench_sparsity.build_parser, W),
    "bench/speed.py": (bench_speed.build_parser, ["--before", "b.pt", "--after", "a.pt"]),
}


def _numeric_flags() -> list[tuple[str, str, Bounded]]:
    out = []
    for script, (factory, _) in PARSERS.items():
        for action in factory()._actions:
            if isinstance(action.type, Bounded):
                out.append((script, action.option_strings[-1], action.type))
    return out


FLAGS = _numeric_flags()


def _bad_values(t: Bounded) -> list[str]:
    """Zero or negative where not allowed, just outside each end, NaN, infinities, absurdly large,
    and for integers a fraction and a word."""
    values = ["nan", "inf", "-inf", "1e30", "-1e30", "abc"]
    step = 1 if t.kind is int else 1e-3 * max(1.0, abs(t.hi - t.lo))
    below = t.lo if t.lo_open else t.lo - step
    above = t.hi if t.hi_open else t.hi + step
    values += [str(int(v)) if t.kind is int else repr(v) for v in (below, above)]
    if t.kind is int:
        values += ["1.5"]
    if t.lo > 0 or t.lo_open:
        values += ["0", "-1"]
    return [v for v in values if not _allowed(t, v)]


def _allowed(t: Bounded, text: str) -> bool:
    try:
        v = t.kind(text)
    except ValueError:
        return False
    return v in t.extra


def _parse_error(factory, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        factory().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, not argparse's usage dump
    return err


def test_every_numeric_flag_of_every_script_has_a_bounded_type():
    """A bare int or float lets 0, -1, NaN and 1e30 through to a traceback; choices bound a flag too."""
    loose = [(script, a.option_strings[-1]) for script, (factory, _) in PARSERS.items()
             for a in factory()._actions if a.type in (int, float) and a.choices is None]
    assert not loose
    assert len(FLAGS) > 80  # the parametrization below covers them all


@pytest.mark.parametrize(("script", "flag", "kind"), FLAGS, ids=[f"{s} {f}" for s, f, _ in FLAGS])
def test_bad_numbers_are_one_line_naming_the_flag(script, flag, kind, capsys):
    factory, required = PARSERS[script]
    for bad in _bad_values(kind):
        err = _parse_error(factory, [*required, flag, bad], capsys)
        assert flag in err and "error:" in err, (bad, err)
    # the ends of the range (and the special values) are accepted
    for good in [kind.lo if not kind.lo_open else None, kind.hi if not kind.hi_open else None, *kind.extra]:
        if good is not None and math.isfinite(good):
            text = str(int(good)) if kind.kind is int else repr(float(good))
            a = factory().parse_args([*required, flag, text])
            value = getattr(a, next(x.dest for x in factory()._actions if flag in x.option_strings))
            assert (value[0] if isinstance(value, list) else value) == kind.kind(text)


def test_unknown_flag_names_the_closest_one(capsys):
    err = _parse_error(train.build_parser, ["--img-sise", "64"], capsys)
    assert "unrecognized arguments: --img-sise 64" in err and "did you mean --img-size?" in err
    err = _parse_error(detect.build_parser, [*W, "--source", "x.jpg", "--conf-thresh", "0.3"], capsys)
    assert "did you mean --conf-thres?" in err
    err = _parse_error(test_script.build_parser, [], capsys)  # a missing required flag
    assert "--weights" in err


def test_underscores_and_dashes_are_one_spelling():
    a = detect.build_parser().parse_args([*W, "--conf_thres", "0.3", "--img_size", "96", "--save_txt"])
    assert a.conf_thres == 0.3 and a.img_size == 96 and a.save_txt
    a = detect.build_parser().parse_args([*W, "--iou-thres=0.5", "--max_det=7"])  # with '=' too
    assert a.iou_thres == 0.5 and a.max_det == 7


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["train.py", "--img-size", "0"],
    ["train.py", "--epochs", "-1"],
    ["train.py", "-sr", "--s", "nan"],
    ["export.py", "--weights", "x.pt", "--opset", "1"],
    ["compress.py", "--latency-runs", "0"],
])
def test_scripts_refuse_bad_numbers_without_a_traceback_or_a_folder(argv, tmp_path):
    """Run as a user would: exit 2, one line, nothing created in the working folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert argv[-2] in r.stderr
    assert not list(tmp_path.iterdir())  # no empty run folder left behind
