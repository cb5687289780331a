"""compress.py: a miniature recipe through every stage, the report's figures, skipping, resuming, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import yaml

import compress
from pipeline.recipe import load_recipe
from quant.qdq import float_kernels, ort_kernels, tensorrt_rule_violations
from tests.conftest import REPO
from utils.errors import UserError

TRAIN = {"epochs": 1, "batch-size": 4, "workers": 0}
MINI = {
    "img_size": 64,
    "stages": {
        "baseline": {"run": "train", **TRAIN},
        "sparse": {"run": "train", "sr": True, "s": 0.01, "prune": 1, **TRAIN},
        "prune": {"run": "prune", "method": "slim", "percent": 0.5, "recalibrate": 1, "batch-size": 4},
        "finetune": {"run": "train", "hyp": "data/hyp.finetune.yaml", "t_weights": "baseline",
                     "KDstr": 3, **TRAIN},
        "ptq": {"run": "ptq", "int8-target": "ort", "images": 8, "batch-size": 4},
        "qat": {"run": "train", "quantized": "google", "BN_Fold": True, "int8-target": "ort",
                "freeze-observer-epoch": 0, **TRAIN},
        "export": {"run": "export", "include": ["onnx-int8"]},
        "ptq_trt": {"run": "ptq", "from": "finetune", "a-symmetric": True, "images": 8, "batch-size": 4},
        "export_trt": {"run": "export", "include": ["onnx-int8"]},
        "export_float": {"run": "export", "from": "finetune", "include": ["onnx", "weights"]},
    },
}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(recipe: Path, data: Path, project: Path, *extra: str) -> Path:
    return compress.main(["--recipe", str(recipe), "--data", str(data), "--project", str(project),
                          "--latency-runs", "2", *extra])


@pytest.fixture(scope="module")
def mini_run(shapes_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(recipe, project, report.md) of the miniature recipe, run once for the tests of this module."""
    tmp = tmp_path_factory.mktemp("compress")
    recipe = write_recipe(tmp / "mini.yaml", MINI)
    return recipe, tmp / "runs", run(recipe, shapes_data, tmp / "runs")


def test_miniature_recipe_report_is_consistent(mini_run):
    md = mini_run[2]
    report = json.loads((md.parent / "report.json").read_text())
    rows = {r["stage"]: r for r in report["stages"]}
    assert list(rows) == ["baseline", "sparse", "prune", "finetune", "ptq", "qat", "ptq_trt"]  # not exports
    assert rows["sparse"]["params"] == rows["baseline"]["params"]
    assert rows["prune"]["params"] < 0.8 * rows["sparse"]["params"]
    assert rows["prune"]["gflops"] < rows["sparse"]["gflops"]
    assert rows["finetune"]["params"] == rows["qat"]["params"] == rows["prune"]["params"]
    assert rows["qat"]["bits"] == 8 and rows["finetune"]["bits"] == 32
    assert rows["qat"]["deployed_mb"] == pytest.approx(rows["finetune"]["deployed_mb"] / 4)
    ratio = rows["prune"]["params"] / rows["baseline"]["params"]
    assert report["ratios"]["prune"]["params"] == pytest.approx(ratio)
    for r in rows.values():
        assert 0 <= r["map"] <= r["map50"] <= 1
        assert r["torch_ms"] > 0 and r["ort_ms"] > 0
        assert r["file_mb"] == pytest.approx(r["params"] * 4 / 1e6, rel=0.1)
    assert rows["qat"]["ort_file"].endswith("qat.int8.onnx")
    # each INT8 stage is timed as deployed and compared with the float model it came from
    assert rows["qat"]["float_source"] == rows["ptq_trt"]["float_source"] == "finetune"
    assert rows["finetune"]["float_source"] is None
    qat_line = next(line for line in md.read_text().splitlines() if line.startswith("| qat ("))
    assert f"{rows['qat']['ort_ms'] / rows['finetune']['ort_ms']:.2f}× finetune" in qat_line
    assert "(simulated)" in qat_line
    assert rows["qat"]["int8_target"] == "ort" and rows["ptq_trt"]["int8_target"] == "trt"
    assert "qat.int8.onnx (onnxruntime's layout: integer kernels)" in md.read_text()
    for fig in ("accuracy_vs_gflops.png", "accuracy_vs_latency.png", "gamma.png", "channels.png",
                "layer_latency.png"):
        assert fig in report["figures"] and cv2.imread(str(md.parent / fig)) is not None
    # where the time goes: every conv of the model before pruning and of the pruned one, timed
    before, after = report["layers"]["models"]
    assert (before["stage"], after["stage"]) == ("sparse", "prune")
    for m in (before, after):
        convs = [r for r in m["rows"] if r["type"] == "convolutional"]
        assert convs and all(r["ort_ms"] > 0 and r["torch_ms"] > 0 and r["gflops"] > 0 for r in convs)
    assert sum(r["gflops"] for r in after["rows"]) == pytest.approx(rows["prune"]["gflops"], rel=1e-6)
    assert sum(r["gflops"] for r in before["rows"]) == pytest.approx(rows["sparse"]["gflops"], rel=1e-6)
    text = md.read_text()
    assert "## Where the time goes" in text
    # onnxruntime timed as deployed (spinning threads, one session at a time), and the report says so
    assert report["ort_spinning"] is True and "onnxruntime's sessions one at a time" in text
    # the first lines say what each exported model buys against the baseline, in its measured numbers
    top = text.split("Recipe `", 1)[0]
    base, qat = rows["baseline"], rows["qat"]
    assert (f"**`qat`** (exported by `export`, INT8 for onnxruntime): "
            f"{base['ort_ms'] / qat['ort_ms']:.1f}× as fast as `baseline` in onnxruntime") in top
    assert (f"mAP@0.5 {qat['map50']:.3f} ({abs(base['map50'] - qat['map50']) * 100:.1f} points "
            f"{'below' if qat['map50'] <= base['map50'] else 'above'} `baseline`) and mAP@0.5:0.95 "
            f"{qat['map']:.3f}") in top
    assert "**`ptq_trt`** (exported by `export_trt`, INT8 in TensorRT's layout)" in top
    assert "**`finetune`** (exported by `export_float`, float)" in top
    for stage in rows:
        assert f"| {stage} (" in text


def test_report_names_the_run_files_relative_to_the_run_folder(mini_run, shapes_data, tmp_path):
    from pipeline.report import render

    md = mini_run[2]
    run_dir = md.parent.parent
    report = json.loads((md.parent / "report.json").read_text())
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["baseline"]["checkpoint"] == "baseline/weights/last.pt"
    assert rows["prune"]["checkpoint"] == "prune/pruned.pt"
    assert rows["qat"]["ort_file"] == "report/onnx/qat.int8.onnx"
    assert sorted(report["exports"]) == sorted(report["export_mb"])
    files = [*report["exports"], *(r[k] for r in rows.values() for k in ("checkpoint", "ort_file"))]
    for p in files:
        assert not Path(p).is_absolute() and (run_dir / p).exists(), p
    assert report["data"] == report["data_file"] == str(shapes_data)  # the user's own, outside: as given
    assert [r["name"] for r in report["records"]] == list(MINI["stages"])
    text = md.read_text()
    tables = text.split("## Stages")[0] + text.split("## Exports")[1]  # (commands name what they ran on)
    assert f"{run_dir}/" not in tables and "report/onnx/qat.int8.onnx" in tables  # no run file absolute
    # the markdown is made from the json alone: python -m pipeline.report rebuilds it
    assert render(md.parent / "report.json", tmp_path).read_text() == text


def test_miniature_recipe_exports_load(mini_run):
    import onnxruntime as ort

    project, md = mini_run[1:]
    exports = [md.parent.parent / p for p in json.loads((md.parent / "report.json").read_text())["exports"]]
    by_suffix = {"".join(p.suffixes): p for p in exports}
    assert sorted("".join(p.suffixes) for p in exports) == [".cfg", ".int8.onnx", ".int8.onnx", ".onnx",
                                                              ".weights"]
    int8 = {p.parent.name: p for p in exports if p.name.endswith(".int8.onnx")}
    assert sorted(int8) == ["export", "export_trt"]  # each in its export stage's folder
    assert float_kernels(ort_kernels(int8["export"])) == 0  # the CPU file: every conv on integer kernels
    assert tensorrt_rule_violations(onnx.load(str(int8["export_trt"]))) == []  # the Jetson file
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    for path in [*int8.values(), by_suffix[".onnx"]]:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (dets,) = sess.run(None, {sess.get_inputs()[0].name: x})
        assert dets.shape[0] == 1 and dets.shape[2] == 5 + 6
    net = cv2.dnn.readNetFromDarknet(str(by_suffix[".cfg"]), str(by_suffix[".weights"]))
    net.setInput(x)
    assert len(net.forward(net.getUnconnectedOutLayersNames())) == 2
    pruned_cfg = (project / "mini" / "prune" / "pruned.cfg").read_text()
    assert by_suffix[".cfg"].read_text() == pruned_cfg  # the fine-tuned model kept the pruned architecture


def test_second_run_skips_finished_stages_and_restart_reruns(mini_run, shapes_data, capsys):
    recipe, project, _ = mini_run
    before = {p.parent.name: p.read_text() for p in (project / "mini").glob("*/stage.json")}
    run(recipe, shapes_data, project, "--no-report")
    out = capsys.readouterr().out
    assert out.count("skipped: done earlier") == len(MINI["stages"])
    assert {p.parent.name: p.read_text() for p in (project / "mini").glob("*/stage.json")} == before

    run(recipe, shapes_data, project, "--no-report", "--restart-from", "export")
    out = capsys.readouterr().out
    assert out.count("skipped: done earlier") == 6  # baseline .. qat
    assert f"removed {project / 'mini' / 'export'}" in out
    assert json.loads((project / "mini" / "export" / "stage.json").read_text())["finished"]


def test_changed_stage_options_need_restart(mini_run, shapes_data, tmp_path):
    project = mini_run[1]
    changed = {**MINI, "stages": {**MINI["stages"], "prune": {**MINI["stages"]["prune"], "percent": 0.3}}}
    with pytest.raises(UserError, match="--restart-from prune"):
        run(write_recipe(tmp_path / "mini.yaml", changed), shapes_data, project, "--no-report")


def test_interrupted_training_stage_continues(shapes_data, tmp_path, monkeypatch, capsys):
    from engine.trainer import Trainer

    recipe = write_recipe(tmp_path / "two.yaml", {"img_size": 64, "stages": {
        "baseline": {"run": "train", **TRAIN, "epochs": 2}}})
    original = Trainer.train_one_epoch

    def interrupt_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, shapes_data, tmp_path / "runs", "--no-report")
    record = json.loads((tmp_path / "runs" / "two" / "baseline" / "stage.json").read_text())
    assert not record["finished"]
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    run(recipe, shapes_data, tmp_path / "runs", "--no-report")
    assert "continuing the interrupted stage" in capsys.readouterr().out
    from models.io import load_checkpoint

    last = tmp_path / "runs" / "two" / "baseline" / "weights" / "last.pt"
    assert load_checkpoint(last)["meta"]["epoch"] == 1


def test_given_weights_replace_the_first_stage(mini_run, shapes_data, tmp_path):
    """compress.py --weights: the FPGA path from a trained checkpoint (PTQ --FPGA, the integer package)."""
    _, project, _ = mini_run
    trained = project / "mini" / "finetune" / "weights" / "last.pt"
    recipe = write_recipe(tmp_path / "fpga.yaml", {"img_size": 64, "stages": {
        "baseline": {"run": "train", **TRAIN},
        "ptq": {"run": "ptq", "FPGA": True, "images": 4, "batch-size": 4},
        "export": {"run": "export", "include": ["fpga"]}}})
    md = run(recipe, shapes_data, tmp_path / "runs", "--weights", str(trained))
    report = json.loads((md.parent / "report.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["baseline", "ptq"]
    assert report["stages"][0]["checkpoint"] == str(trained.resolve())
    assert "no INT8 ONNX" in report["stages"][1]["ort_file"]  # power-of-two affine: no TensorRT form
    (package,) = report["exports"]
    assert not Path(package).is_absolute()  # relative to the run folder
    assert json.loads((md.parent.parent / package / "manifest.json").read_text())["layers"]
    assert "given (`--weights`)" in md.read_text()


@pytest.mark.parametrize("stage, message", [
    ({"run": "train", "epochz": 1}, "'epochz' is not a flag of"),
    ({"run": "train", "weights": "x.pt"}, "'weights' is set by compress.py"),
    ({"run": "prune", "method": "thin"}, "'method' must be one of"),
    ({"run": "train", "sr": "yes"}, "'sr' takes true or false"),
    ({"run": "ptq", "calib": "median"}, "'calib' must be one of minmax, percentile, mse, not 'median'"),
    ({"run": "export", "from": "later"}, "must name an earlier stage"),
    ({"run": "fly"}, "run 'fly' is not one of"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, stage, message):
    recipe = write_recipe(tmp_path / "bad.yaml", {"stages": {"baseline": {"run": "train"}, "second": stage,
                                                             "later": {"run": "train"}}})
    with pytest.raises(UserError, match=message) as e:
        load_recipe(recipe)
    assert "stage 'second'" in str(e.value) and "\n" not in str(e.value)


def test_shipped_recipes_load():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"default", "jetson-int8", "fpga-pow2"}
    for path in recipes:
        stages = load_recipe(path).stages
        assert [s.run for s in stages][:4] == ["train", "train", "prune", "train"]
        assert any(s.run == "export" for s in stages)  # a deliverable
    control = load_recipe(REPO / "recipes" / "default.yaml").stages[-1]  # the unpruned reference
    assert (control.name, control.run, control.source) == ("control", "train", "baseline")


def test_folder_not_made_by_compress_is_left_alone(shapes_data, tmp_path):
    recipe = write_recipe(tmp_path / "one.yaml", {"img_size": 64,
                                                  "stages": {"baseline": {"run": "train", **TRAIN}}})
    mine = tmp_path / "runs" / "one" / "baseline"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"not made by compress\.py"):
        run(recipe, shapes_data, tmp_path / "runs")
    with pytest.raises(UserError, match=r"not made by compress\.py"):
        run(recipe, shapes_data, tmp_path / "runs", "--restart-from", "baseline")
    assert (mine / "notes.txt").read_text() == "mine"


def test_torchrun_two_processes(shapes_data, tmp_path):
    """Under torchrun the training stages run on both processes, the rest on rank 0 (gloo, CPU)."""
    import os
    import subprocess
    import sys

    recipe = write_recipe(tmp_path / "ddp.yaml", {"img_size": 64, "stages": {
        "baseline": {"run": "train", **TRAIN},
        "prune": {"run": "prune", "method": "normal", "percent": 0.3},
        "finetune": {"run": "train", **TRAIN},
        "export": {"run": "export", "include": ["onnx"]}}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29541", str(REPO / "compress.py"), "--recipe", str(recipe),
                        "--data", str(shapes_data), "--project", str(tmp_path / "runs"), "--device", "cpu",
                        "--no-report"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    records = {s: json.loads((run / s / "stage.json").read_text()) for s in MINI_DDP_STAGES}
    assert all(rec["finished"] for rec in records.values())
    for stage in ("baseline", "finetune"):
        assert yaml.safe_load((run / stage / "opt.yaml").read_text())["world_size"] == 2
    assert Path(records["export"]["outputs"][0]).is_file()
    assert r.stdout.count("=== stage 1/4") == 1  # rank 0 alone reports progress


MINI_DDP_STAGES = ("baseline", "prune", "finetune", "export")


def test_given_weights_must_be_a_checkpoint(shapes_data, tmp_path):
    recipe = write_recipe(tmp_path / "one.yaml", {"stages": {"baseline": {"run": "train", **TRAIN}}})
    darknet = tmp_path / "yolo.weights"
    darknet.write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match=r"starts from a \.pt checkpoint"):
        run(recipe, shapes_data, tmp_path / "runs", "--weights", str(darknet))
    with pytest.raises(UserError, match="file not found"):
        run(recipe, shapes_data, tmp_path / "runs", "--weights", str(tmp_path / "missing.pt"))
    assert not (tmp_path / "runs").exists()
