"""The older tool's users at home: its README's command lines run here as written (with tiny sizes),
its spellings are accepted, and a mistake that used to give a silently wrong model is refused."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import detect
import test as test_script
import train
from models.cfg import read_cfg, save_cfg
from models.darknet import Darknet
from models.io import save_darknet_weights, with_classes
from utils.cli import run_cli
from utils.errors import UserError
from utils.metrics import ap_per_class

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"train.py": train.main, "test.py": test_script.main, "detect.py": detect.main}

# The older tool's README, line by line (its "..." filled with tiny values; {x} are files made below;
# test.py and detect.py get --weights, which the older tool defaulted to a file of its own).
SEED_README = [
    "python3 train.py --data {data} --batch-size 4 --weights {darknet} -pt --cfg {cfg} "
    "--img-size 64 --epochs 1",
    "python train.py --data {data} --batch_size 4 --weights None --cfg {cfg} --img_size 64 --epochs 1",
    "python3 train.py --data {data} --batch-size 4 -pt --weights {darknet} --cfg {cfg} "
    "--img_size 64 --epochs 1",
    "python3 train.py --data {data} --batch-size 4 --accumulate 1 --weights {darknet} --cfg {cfg} "
    "--img-size 64 --epochs 1",
    "python3 train.py --data {data} -pt --batch-size 4  --weights {darknet} --cfg {cfg} "
    "-sr --s 0.001 --prune 0 --img-size 64 --epochs 1",
    "python3 train.py --data {data} -pt --batch-size 4  --weights {darknet} --cfg {cfg} "
    "-sr --s 0.001 --prune 1 --img-size 64 --epochs 1",
    "python3 train.py --data {data} -pt --batch-size 4  --weights {darknet} --cfg {cfg} "
    "-sr --s 0.001 --prune 2 --img-size 64 --epochs 1",
    "python3 normal_prune.py --cfg {cfg} --data {data} --weights {pt} --percent 0.3",
    "python3 regular_prune.py --cfg {cfg} --data {data} --weights {pt} --percent 0.3",
    "python3 shortcut_prune.py --cfg {cfg} --data {data} --weights {pt} --percent 0.3",
    "python3 slim_prune.py --cfg {cfg} --data {data} --weights {pt} --percent 0.3",
    "python3 layer_prune.py --cfg {cfg} --data {data} --weights {pt} --shortcut 1",
    "python3 layer_channel_prune.py --cfg {cfg} --data {data} --weights {pt} --shortcut 1 --percent 0.3",
    "python train.py --data {data} --batch-size 4 --weights {pt} --cfg {cfg} --img-size 64 --epochs 1 "
    "--quantized 2",
    "python train.py --data {data} --batch-size 4 --weights {pt} --cfg {cfg} --img-size 64 --epochs 1 "
    "--quantized 1",
    "python train.py --data {data} --batch-size 4 --weights {pt} --cfg {cfg} --img-size 64 --epochs 1 "
    "--quantized 1 --BN_Flod --FPGA",
    "python train.py --data {data} --batch-size 4 --weights {pt} --cfg {cfg} --img-size 64 --epochs 1 "
    "--t_cfg {cfg} --t_weights {pt}",
    "python train.py --data {data} --batch-size 4 --weights {pt} --cfg {cfg} --img-size 64 --epochs 1 "
    "--t_cfg {cfg} --t_weights {pt} --KDstr 5",
    "python3 test.py --data {data} --cfg {cfg} --weights {pt}",
    "python3 detect.py --data {data} --cfg {cfg} --source {samples} --weights {pt}",
]


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory, shapes_data) -> dict[str, str]:
    """A dataset, its cfg (the user's own, with its class count), darknet weights for it and a .pt
    trained from them, as a user of the older tool has them."""
    root = tmp_path_factory.mktemp("seed")
    cfg = with_classes(read_cfg(ROOT / "cfg" / "yolo-small.cfg"), 6)
    save_cfg(cfg, root / "yolo-small-shapes.cfg")
    save_darknet_weights(Darknet(cfg), root / "yolo-small-shapes.weights")
    files = {"data": str(shapes_data), "cfg": str(root / "yolo-small-shapes.cfg"),
             "darknet": str(root / "yolo-small-shapes.weights"), "samples": str(ROOT / "data" / "samples")}
    argv = ["--data", files["data"], "--cfg", files["cfg"], "--weights", files["darknet"], "--img-size", "64",
            "--epochs", "1", "--batch-size", "4", "--project", str(root / "runs"), "--name", "trained"]
    assert run_cli(train.main, argv) == 0
    files["pt"] = str(root / "runs" / "trained" / "weights" / "last.pt")
    return files


@pytest.mark.parametrize("line", SEED_README, ids=lambda s: " ".join(s.split()[1:2] + s.split()[-3:]))
def test_seed_readme_line_runs(line, seed_files, tmp_path, monkeypatch, capsys):
    argv = shlex.split(line.format(**seed_files))
    script, args = argv[1], argv[2:]
    monkeypatch.chdir(tmp_path)  # outputs land in runs/ here, as they would in the user's folder
    if script in SCRIPTS:
        assert run_cli(SCRIPTS[script], args) == 0, capsys.readouterr().err
    else:  # a prune script at the project root, run as a file the way the older tool ran it
        r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert list(tmp_path.glob("runs/prune/*/pruned.pt"))


def _error(main, argv, capsys) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------ spellings

def test_underscore_spellings_are_the_dashed_flags():
    job = train.parse_args(["--img_size", "96", "--batch_size", "8", "--bn_fold", "--quantized", "1",
                            "--t-weights", "t.pt", "--kd_str", "2", "-pt", "--weights", "w.pt"])
    assert job.core.img_size == [96] and job.core.batch_size == 8 and job.core.pt
    assert job.quant.bn_fold and job.distill.t_weights == "t.pt" and job.distill.kd_str == 2
    assert train.parse_args(["--BN_Flod", "--quantized", "google"]).quant.bn_fold
    core = train.parse_args(["--accumulate", "3", "--weights", "None"]).core
    assert core.accumulate == 3 and core.weights == ""  # the older tools' "no initial weights"


def test_unknown_flag_is_one_line_with_a_suggestion(capsys):
    err = _error(train.main, ["--img-sise", "64"], capsys)
    assert "did you mean --img-size?" in err
    err = _error(detect.main, ["--weights", "x.pt", "--conf_thresh", "0.3"], capsys)
    assert "did you mean --conf-thres?" in err


@pytest.mark.parametrize("args, flag, switch", [
    (["--BN_Fold"], "--BN_Fold", "--quantized"),
    (["--FPGA"], "--FPGA", "--quantized"),
    (["--w-bit", "4"], "--w-bit", "--quantized"),
    (["--a-bit", "4"], "--a-bit", "--quantized"),
    (["--t_cfg", "teacher.cfg"], "--t_cfg", "--t_weights"),
    (["--kd-t", "2"], "--kd-t", "--t_weights"),
    (["--s", "0.01"], "--s", "-sr"),
    (["--prune-method", "slim"], "--prune-method", "-sr"),
    (["--sr-schedule", "global"], "--sr-schedule", "-sr"),
])
def test_a_flag_that_would_do_nothing_is_refused(args, flag, switch, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _error(train.main, args, capsys)
    assert flag in err and switch in err and "does nothing" in err
    assert not (tmp_path / "runs").exists()


def test_pt_without_weights_is_refused(capsys):
    assert "-pt" in _error(train.main, ["-pt"], capsys)


def test_teacher_without_strategy_is_strategy_1(capsys):
    job = train.parse_args(["--t_weights", "teacher.pt"])
    assert job.distill.kd_str == 1 and "strategy 1" in capsys.readouterr().out


def test_root_prune_scripts_are_the_prune_scripts(tmp_path):
    # one interpreter runs the six files as scripts (runpy, as `python X_prune.py --help` would)
    code = ("import runpy, sys\n"
            "for m in sys.argv[1:]:\n"
            "    sys.argv = [m, '--help']\n"
            "    try:\n"
            "        runpy.run_path(m, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (m, e.code)\n")
    names = [f"{m}_prune.py" for m in ("normal", "shortcut", "slim", "regular", "layer", "layer_channel")]
    r = subprocess.run([sys.executable, "-c", code, *(str(ROOT / n) for n in names)], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for m in ("normal", "shortcut", "slim", "regular", "layer", "layer_channel"):
        assert f"usage: prune/{m}_prune.py" in r.stdout


# ------------------------------------------------------------------ a cfg that is not the .pt's network

@pytest.fixture(scope="module")
def small_pt(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A .pt of yolo-small (6 classes), its own cfg, and the cfg of another network."""
    from models.io import save_checkpoint

    root = tmp_path_factory.mktemp("mismatch")
    cfg = with_classes(read_cfg(ROOT / "cfg" / "yolo-small.cfg"), 6)
    save_checkpoint(root / "small.pt", Darknet(cfg), names=[f"c{i}" for i in range(6)], img_size=64)
    save_cfg(cfg, root / "own.cfg")
    other = cfg.copy()
    other.layers[0].set("filters", 8)  # a pruned-looking first layer
    save_cfg(other, root / "other.cfg")
    (root / "six.data").write_text("classes=6\n")  # enough for train.py to reach the model
    return root / "small.pt", root / "own.cfg", root / "other.cfg"


def _scripts_with_cfg(pt: Path, cfg: Path, out: Path) -> dict[str, tuple]:
    import export as export_script
    from prune import cli as prune_cli
    from quant import ptq

    data = str(ROOT / "datasets" / "none.data")  # never reached: the cfg is refused first
    given = ["--weights", str(pt), "--cfg", str(cfg)]
    return {
        "test.py": (test_script.main, [*given, "--data", data]),
        "detect.py": (detect.main, [*given, "--source", str(ROOT / "data" / "samples")]),
        "export.py": (export_script.main, [*given, "--output", str(out / "x")]),
        "slim_prune.py": (lambda argv: prune_cli.main("slim", argv), given),
        "quant.ptq": (ptq.main, [*given, "--data", data]),
        "train.py": (train.main, [*given, "--epochs", "1", "--data", str(pt.parent / "six.data")]),
    }


@pytest.mark.parametrize("script", ["test.py", "detect.py", "export.py", "slim_prune.py", "quant.ptq",
                                    "train.py"])
def test_cfg_that_is_not_the_pt_is_refused(script, small_pt, tmp_path, monkeypatch, capsys):
    pt, _, other = small_pt
    monkeypatch.chdir(tmp_path)
    main, argv = _scripts_with_cfg(pt, other, tmp_path)[script]
    err = _error(main, argv, capsys)
    assert "--cfg" in err and "layer 0 [convolutional] filters=32 in the .pt, 8 in the cfg" in err, err
    assert "leave out --cfg" in err
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("x*"))


def test_cfg_that_is_the_pt_is_accepted(small_pt):
    from models.io import load_model

    pt, own, _ = small_pt
    model = load_model(pt, own)
    assert model.cfg == with_classes(read_cfg(ROOT / "cfg" / "yolo-small.cfg"), 6)


def test_training_may_change_the_class_count_only(small_pt):
    from models.io import load_model

    pt, own, other = small_pt
    model = load_model(pt, with_classes(read_cfg(own), 2), transfer=True)
    assert model.cfg.classes == 2
    with pytest.raises(UserError, match="layer 0"):
        load_model(pt, with_classes(read_cfg(other), 2), transfer=True)


def test_load_warning_is_short(small_pt, caplog):
    from models.io import load_model

    pt, own, _ = small_pt
    load_model(pt, with_classes(read_cfg(own), 2), transfer=True)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 4:" in warning and "and 1 more" in warning and len(warning) < 600


# ------------------------------------------------------------------ data, metrics, timing

def test_missing_builtin_benchmark_path_names_how_it_is_made(tmp_path):
    from utils.datasets import read_data_file

    with pytest.raises(UserError, match="made on first use"):
        read_data_file(tmp_path / "shapes.data")


def test_builtin_benchmark_is_made_at_its_documented_path(tmp_path, monkeypatch):
    from utils import synthetic
    from utils.datasets import read_data_file

    params = synthetic.ShapesParams(n_train=2, n_val=1, img_min=64, img_max=64)
    monkeypatch.setattr(synthetic, "DATASETS", tmp_path)
    monkeypatch.setattr(synthetic, "BUILTIN", {"shapes-mini": params})
    data = read_data_file(tmp_path / "shapes-mini" / "shapes.data")
    assert data.classes == len(synthetic.NAMES) and len(list((tmp_path / "shapes-mini").rglob("*.jpg"))) == 3


def test_precision_of_a_class_without_detections_above_the_threshold_is_0():
    # class 0: a hit at 0.9 and a miss at 0.3; class 1: one weak hit of 100 boxes, at 0.1, below the
    # confidence that maximises the mean F1: class 1 has no detection there, so its precision is 0
    tp = np.array([[True], [False], [True]])
    conf = np.array([0.9, 0.3, 0.1])
    stats = ap_per_class(tp, conf, np.array([0, 0, 1]), np.array([0, 0] + [1] * 100))
    assert stats.conf > 0.3
    assert stats.p[0] == pytest.approx(1.0, abs=1e-3) and stats.p[1] == 0.0


def test_latency_ratio_spread():
    from models.summary import ratio_spread

    steady = ratio_spread([10.0] * 9, [6.0] * 9)
    assert steady.median == pytest.approx(0.6) and not steady.wide
    noisy = ratio_spread([10.0] * 9, [3.0, 9.0, 5.0, 12.0, 6.0, 4.0, 8.0, 6.0, 7.0])
    assert noisy.wide and noisy.q1 < 0.6 < noisy.q3



def test_detect_defaults_to_the_sample_images(small_pt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another folder: the samples are found in the project's data/samples
    summary = detect.main(["--weights", str(small_pt[0])])
    assert summary.frames == len(list((ROOT / "data" / "samples").glob("*.jpg"))) >= 3
    assert summary.output == Path("runs/detect/exp") and len(summary.written) == summary.frames


def test_detect_that_cannot_open_its_source_leaves_no_folder(small_pt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = _error(detect.main, ["--weights", str(small_pt[0]), "--source", "rtsp://127.0.0.1:9/none"], capsys)
    assert "cannot open" in err and not (tmp_path / "runs").exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    _error(detect.main, ["--weights", str(small_pt[0]), "--source", "rtsp://127.0.0.1:9/none",
                         "--output", str(keep / "out")], capsys)
    assert keep.is_dir() and not (keep / "out").exists()  # only what the command made is removed
