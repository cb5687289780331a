"""Nothing lost, nothing run, nothing silent: each fault a user or a crash can cause, run for real.

A poisoned label cache or checkpoint never executes; a resumed run writes only beside its checkpoint;
every writer refuses inputs and existing files before its first write; an interrupted save keeps the
previous file and ``best.pt`` in step with the record; bad data is skipped and counted, or one line.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
import export
import train as train_script
from models.io import load_checkpoint, load_model, save_checkpoint
from prune import cli as prune_cli
from quant import ptq
from stages.train import resumed, trainer
from tests.conftest import REPO, tame_model
from tests.test_datasets import make_dataset
from tests.test_train import StopAt, tiny_opts
from utils.cli import run_cli
from utils.datasets import cache_path, load_labels, read_data_file
from utils.errors import UserError
from utils.outputs import temp_name

# ------------------------------------------------------------------------------- nothing runs


class Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_poisoned_label_cache_never_executes_and_is_rebuilt(tmp_path, capsys):
    data = read_data_file(make_dataset(tmp_path / "ds"))
    marker = tmp_path / "pwned"
    poison = pickle.dumps({"key": "x", "labels": Payload(marker)})
    # where the old code looked (beside the list) and where the cache lives now
    (tmp_path / "ds" / "images" / "labels.cache").write_bytes(poison)
    cache = cache_path(data.train)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(poison)
    labels = load_labels(data.train, data.classes)
    assert not marker.exists()
    assert "label cache" in capsys.readouterr().err and len(labels.images) == 4
    # rebuilt as plain arrays that load without pickle
    with np.load(cache, allow_pickle=False) as z:
        assert int(z["counts"].sum()) == 4
    # an .npz holding a pickled object array is refused the same way
    np.savez(cache.with_suffix(""), key=np.array([Payload(marker)], dtype=object))
    load_labels(data.train, data.classes)
    assert not marker.exists()


def test_a_tampered_cache_is_rebuilt_not_trusted(tmp_path, capsys):
    data = read_data_file(make_dataset(tmp_path / "ds"))
    load_labels(data.train, data.classes)
    cache = cache_path(data.train)
    with np.load(cache, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    a["labels"][0, 0] = 7  # a class the data does not have
    np.savez(cache.with_suffix(""), **a)
    labels = load_labels(data.train, data.classes)
    assert "inconsistent contents; rebuilding" in capsys.readouterr().err
    assert all(x[:, 0].max() < 2 for x in labels.labels)


def test_a_dataset_path_never_makes_the_program_write_beside_it(tmp_path):
    """``train=`` may name any file: the cache goes to the cache folder, never beside the list."""
    ds = tmp_path / "ds"
    data_file = make_dataset(ds)
    lst = tmp_path / "elsewhere" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("".join(f"{ds / 'images' / f'{i}.jpg'}\n" for i in range(4)))
    before = sorted(p.name for p in lst.parent.iterdir())
    load_labels(lst, 2)
    assert sorted(p.name for p in lst.parent.iterdir()) == before
    assert cache_path(lst).is_file() and cache_path(lst).parent == cache_path(data_file).parent
    bad = tmp_path / "passwd.data"
    bad.write_text(f"classes=2\ntrain={tmp_path / 'passwd'}\nvalid={tmp_path / 'passwd'}\n")
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(UserError, match="no readable images"):
        load_labels(read_data_file(bad).train, 2)
    assert not (tmp_path / "passwd.cache").exists()


def test_a_poisoned_checkpoint_is_refused_without_advice_to_trust_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    pt = tmp_path / "best.pt"
    torch.save({"format": "yolo-compress-checkpoint", "model": Payload(marker)}, pt)
    assert run_cli(export.main, ["--weights", str(pt)]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and "refused" in err and err.count("\n") == 1
    assert "weights_only" not in err


# ------------------------------------------------------------------------------- resume


def test_resume_writes_only_beside_its_checkpoint(shapes_data, tmp_path):
    """A run renamed after it was interrupted continues where its last.pt now is, even when a new run
    took its old name."""
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny_opts(shapes_data, tmp_path, epochs=2), [StopAt(1)]).fit()
    (tmp_path / "exp").rename(tmp_path / "exp_first")
    trainer(tiny_opts(shapes_data, tmp_path, epochs=1)).fit()  # a new run named exp
    other = {p: p.read_bytes() for p in (tmp_path / "exp").rglob("*") if p.is_file()}
    last = tmp_path / "exp_first" / "weights" / "last.pt"
    train_script.main(["--resume", str(last)])
    assert {p: p.read_bytes() for p in (tmp_path / "exp").rglob("*") if p.is_file()} == other
    meta = load_checkpoint(last)["meta"]
    assert meta["epoch"] == 1 and Path(meta["run_dir"]) == (tmp_path / "exp_first").resolve()
    rows = (tmp_path / "exp_first" / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # epochs counted from 1


def test_best_pt_is_saved_before_it_is_recorded_and_rederived_on_resume(shapes_data, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny_opts(shapes_data, tmp_path, epochs=3), [StopAt(2)]).fit()
    weights = tmp_path / "exp" / "weights"
    assert (weights / "last.pt").stat().st_mtime_ns >= (weights / "best.pt").stat().st_mtime_ns
    # what a kill between the two writes of an older version left: last.pt records a best fitness
    # (here one no epoch can beat) that best.pt, still an older epoch's, does not hold
    stale = load_checkpoint(weights / "best.pt")
    stale["meta"]["fitness"], stale["meta"]["epoch"] = -0.5, -1
    torch.save(stale, weights / "best.pt")
    last = load_checkpoint(weights / "last.pt")
    last["meta"]["best_fitness"] = 2.0
    torch.save(last, weights / "last.pt")
    t = trainer(resumed(str(weights / "last.pt")))
    t.fit()
    assert load_checkpoint(weights / "best.pt")["meta"]["epoch"] == 2  # the first epoch that beat it


def test_a_killed_save_leaves_a_temporary_that_the_resumed_run_removes(shapes_data, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny_opts(shapes_data, tmp_path, epochs=2), [StopAt(1)]).fit()
    weights = tmp_path / "exp" / "weights"
    stale = temp_name(weights / "last.pt")
    stale.write_bytes(b"half a checkpoint")
    csv_stale = temp_name(tmp_path / "exp" / "results.csv")
    csv_stale.write_text("epoch\n")
    trainer(resumed(str(weights / "last.pt"))).fit()
    assert not stale.exists() and not csv_stale.exists()
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]


def test_a_run_refused_during_setup_leaves_no_folder(shapes_data, tmp_path):
    bad = tmp_path / "no-labels.data"
    ds = tmp_path / "ds"
    make_dataset(ds)
    shutil.rmtree(ds / "labels")
    bad.write_text(f"classes=2\ntrain={ds / 'images'}\nvalid={ds / 'images'}\n")
    with pytest.raises(UserError, match="not a single valid label row"):
        trainer(tiny_opts(bad, tmp_path / "runs")).fit()
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_training_never_writes_over_its_weights(shapes_data, tmp_path):
    trainer(tiny_opts(shapes_data, tmp_path, epochs=1)).fit()
    last = tmp_path / "exp" / "weights" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(UserError, match="would overwrite the input"):
        trainer(tiny_opts(shapes_data, tmp_path, epochs=1, weights=str(last), exist_ok=True)).fit()
    assert last.read_bytes() == before


# ------------------------------------------------------------------------------- outputs

@pytest.fixture(scope="module")
def small_pt(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    pt = d / "small.pt"
    save_checkpoint(pt, tame_model(REPO / "cfg" / "yolo-small.cfg"), img_size=64)
    return pt


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refused(main, argv, capsys, *names) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for n in names:
        assert n in err, err
    return err


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        cv2.imwrite(str(folder / n), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_detect_never_writes_over_ground_truth_or_sources(small_pt, tmp_path, capsys):
    ds = tmp_path / "ds"
    _images(ds / "images", ["000000.jpg", "000001.jpg"])
    (ds / "labels").mkdir()
    for i in range(2):
        (ds / "labels" / f"00000{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    before = _snapshot(ds)
    base = ["--weights", str(small_pt), "--source", str(ds / "images"), "--save-txt", "--conf-thres", "0.9"]
    for extra in ([], ["--exist-ok"]):  # ground truth stays safe even with --exist-ok
        _refused(detect.main, [*base, "--output", str(ds), *extra], capsys, "labels/000000.txt", "input")
    assert _snapshot(ds) == before
    # a recursive glob whose output is its own folder: refused before the first image is written
    pics = tmp_path / "pics"
    _images(pics, ["x.jpg"])
    _images(pics / "sub", ["y.jpg"])
    before = _snapshot(pics)
    _refused(detect.main, ["--weights", str(small_pt), "--source", str(pics / "**" / "*.jpg"), "--output",
                           str(pics)], capsys, "would overwrite the input")
    assert _snapshot(pics) == before


def test_detect_refuses_existing_outputs_without_exist_ok(small_pt, tmp_path, capsys):
    src = tmp_path / "src"
    _images(src, ["000000.jpg", "000001.jpg"])
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    (out / "000000.jpg").write_bytes(b"user photo")
    (out / "labels" / "000001.txt").write_text("user labels\n")
    before = _snapshot(out)
    args = ["--weights", str(small_pt), "--source", str(src), "--output", str(out), "--save-txt"]
    _refused(detect.main, args, capsys, "000000.jpg", "--exist-ok")
    assert _snapshot(out) == before
    summary = detect.main([*args, "--exist-ok"])
    assert summary.frames == 2 and (out / "000000.jpg").read_bytes() != b"user photo"
    assert cv2.imread(str(out / "000000.jpg")) is not None


def test_detect_keeps_subfolders_so_equal_names_do_not_collide(small_pt, tmp_path):
    pics = tmp_path / "pics"
    _images(pics / "a", ["x.jpg"])
    _images(pics / "b", ["x.jpg"])
    out = tmp_path / "out"
    detect.main(["--weights", str(small_pt), "--source", str(pics / "**" / "*.jpg"), "--output", str(out),
                 "--save-txt"])
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a/x.jpg", "b/x.jpg", "labels/a/x.txt", "labels/b/x.txt"]


def test_detect_skips_a_truncated_jpeg_and_names_it(small_pt, tmp_path, capsys):
    src = tmp_path / "src"
    _images(src, ["good.jpg", "cut.jpg"])
    data = (src / "cut.jpg").read_bytes()
    (src / "cut.jpg").write_bytes(data[:len(data) // 2])
    summary = detect.main(["--weights", str(small_pt), "--source", str(src), "--output", str(tmp_path / "o")])
    assert summary.frames == 1 and summary.skipped == [str(src / "cut.jpg")]
    assert "cut.jpg: truncated JPEG" in capsys.readouterr().err


def test_export_never_writes_over_inputs_or_existing_outputs(small_pt, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    model = load_model(small_pt)
    (d / "yolo.cfg").write_text(model.cfg_text)
    from models.io import save_darknet_weights

    save_darknet_weights(model, d / "yolo.backup")
    (d / "yolo.weights").write_bytes(b"an unrelated file")
    before = _snapshot(d)
    for extra in ([], ["--exist-ok"]):
        _refused(export.main, ["--cfg", str(d / "yolo.cfg"), "--weights", str(d / "yolo.backup"), "--include",
                               "weights", *extra], capsys, "yolo.cfg", "input")
    assert _snapshot(d) == before
    best = d / "best.pt"
    shutil.copy(small_pt, best)
    (d / "best.cfg").write_text("user cfg")
    (d / "best.onnx").write_bytes(b"user onnx")
    before = _snapshot(d)
    _refused(export.main, ["--weights", str(best), "--include", "onnx", "weights"], capsys, "best.onnx",
             "--exist-ok")
    assert _snapshot(d) == before  # checked before the first file, not after the onnx
    written = export.main(["--weights", str(best), "--include", "onnx", "weights", "--exist-ok"])
    assert [p.name for p in written] == ["best.onnx", "best.cfg", "best.weights"]
    assert (d / "best.cfg").read_text() == model.cfg_text


def test_an_interrupted_fpga_export_leaves_no_half_package(tmp_path, capsys):
    from tests.test_export import _pt, _quantized

    pt = Path(_pt(_quantized("yolov3-tiny", fpga=True), tmp_path / "q.pt"))
    half = temp_name(tmp_path / "q_fpga")  # what a kill during an earlier export left
    half.mkdir()
    (half / "layer_000.weight.npy").write_bytes(b"half")
    export.main(["--weights", str(pt), "--include", "fpga"])
    assert not half.exists() and (tmp_path / "q_fpga" / "manifest.json").is_file()
    _refused(export.main, ["--weights", str(pt), "--include", "fpga"], capsys, "q_fpga", "--exist-ok")
    export.main(["--weights", str(pt), "--include", "fpga", "--exist-ok"])  # our own package: replaced
    user = tmp_path / "u_fpga"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    _refused(export.main, ["--weights", str(pt), "--include", "fpga", "--output", str(tmp_path / "u"),
                           "--exist-ok"], capsys, "u_fpga", "left alone")
    assert (user / "thesis.tex").read_text() == "mine"


def test_prune_and_ptq_refuse_a_users_files_in_output(small_pt, shapes_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("pruned.pt", "quantized.pt", "report.json"):
        (out / name).write_text("mine")
    before = _snapshot(out)
    _refused(lambda argv: prune_cli.main("slim", argv), ["--weights", str(small_pt), "--output", str(out)],
             capsys, "pruned.pt", "--exist-ok")
    _refused(ptq.main, ["--weights", str(small_pt), "--data", str(shapes_data), "--output", str(out)],
             capsys, "quantized.pt", "--exist-ok")
    assert _snapshot(out) == before
    prune_cli.main("slim", ["--weights", str(small_pt), "--output", str(out), "--exist-ok",
                            "--latency-runs", "1"])
    assert load_checkpoint(out / "pruned.pt")["meta"]["prune"]["method"] == "slim"


def test_float_export_check_holds_for_barely_trained_models(tmp_path):
    """A barely trained model decodes boxes of millions of pixels (exp of large w, h logits); the
    check compares relative to the box, so a correct export passes and a broken one still fails."""
    from models.onnx import compare_onnx, export_onnx

    model = tame_model(REPO / "cfg" / "yolo-small.cfg")
    for i in model.heads:
        conv, head = model.layers[i - 1].conv, model.layers[i]
        b = conv.bias.detach().view(head.na, -1)
        b[:, 2:4] += 12.0
        conv.bias.data = b.view(-1)
    model.eval()
    out = export_onnx(model.fuse(), tmp_path / "m.onnx", 128)
    from models.onnx import DetectionsOnly

    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    d = compare_onnx(out, DetectionsOnly(model), x)
    assert d.box_px > 1e-2 and d.box_rel < 1e-4  # large in pixels, tiny relative to boxes of ~1e7 px
    with torch.no_grad():  # a real difference still shows
        model.layers[0].conv.weight[0] += 0.5
    assert compare_onnx(out, DetectionsOnly(model), x).box_rel > 1e-4


# ------------------------------------------------------------------------------- bad data


def test_nan_and_inf_classes_are_dropped_and_counted(tmp_path, capsys):
    rows = "nan 0.5 0.5 0.2 0.2\ninf 0.5 0.5 0.2 0.2\n0 nan 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n"
    data = read_data_file(make_dataset(tmp_path, labels={0: rows}))
    ls = load_labels(data.train, data.classes)
    assert ls.bad_rows == 3 and len(ls.labels[0]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'labels' / '0.txt'}:1: class nan" in err


@pytest.mark.parametrize("which", ["data", "list", "names"])
def test_non_utf8_text_files_are_one_line_naming_file_and_line(tmp_path, which):
    data = make_dataset(tmp_path)
    if which == "data":
        target = data
    elif which == "names":
        target = tmp_path / "names.txt"
    else:
        target = tmp_path / "train.txt"
        target.write_text("".join(f"images/{i}.jpg\n" for i in range(4)))
        data.write_text("classes=2\ntrain=train.txt\nvalid=images\nnames=names.txt\n")
    target.write_bytes(target.read_bytes() + b"# caf\xe9\n")
    lines = target.read_bytes().count(b"\n")
    with pytest.raises(UserError, match=rf"{target.name}:{lines}: not UTF-8"):
        d = read_data_file(data)
        load_labels(d.train, d.classes)


def test_a_truncated_jpeg_is_skipped_and_named(tmp_path, capsys):
    data = read_data_file(make_dataset(tmp_path))
    f = tmp_path / "images" / "1.jpg"
    f.write_bytes(f.read_bytes()[:-200])
    ls = load_labels(data.train, data.classes)
    assert ls.bad_images == 1 and f not in ls.images
    assert f"{f}: truncated JPEG" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no labels folder", "every row invalid"])
def test_training_on_no_valid_box_is_an_error(tmp_path, case):
    bad = {i: "5 0.5 0.5 0.2 0.2\n" for i in range(4)}
    data = make_dataset(tmp_path / "ds", labels=bad if case == "every row invalid" else None)
    if case == "no labels folder":
        shutil.rmtree(tmp_path / "ds" / "labels")
    with pytest.raises(UserError, match="not a single valid label row"):
        trainer(tiny_opts(data, tmp_path / "runs")).fit()


@pytest.mark.slow
def test_a_bad_hyp_file_is_one_line(tmp_path):
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("lr0: [0.01\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--hyp", str(hyp)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "--hyp" in r.stderr and "not valid YAML" in r.stderr
