"""detect.py on a generated image, folder and video, with .pt, cfg + darknet weights and .onnx models."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import detect
import export
from models.io import save_checkpoint, save_darknet_weights
from tests.conftest import REPO, tame_model
from utils.cli import run_cli

NAMES = ["circle", "square", "triangle", "star", "cross", "ring"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tame yolo-small as .pt, cfg + .weights and .onnx."""
    d = tmp_path_factory.mktemp("models")
    model = tame_model(REPO / "cfg" / "yolo-small.cfg")
    pt = d / "small.pt"
    save_checkpoint(pt, model, names=NAMES, img_size=64)
    cfg = d / "small.cfg"
    cfg.write_text(model.cfg_text)
    save_darknet_weights(model, d / "small.weights")
    onnx = export.main(["--weights", str(pt), "--img-size", "64"])[0]
    return {"pt": ["--weights", str(pt)],
            "darknet": ["--weights", str(d / "small.weights"), "--cfg", str(cfg)],
            "onnx": ["--weights", str(onnx)]}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    image = d / "one.jpg"
    cv2.imwrite(str(image), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    folder = d / "folder"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    video = d / "clip.mp4"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for _ in range(5):
        w.write(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    w.release()
    return {"image": image, "folder": folder, "video": video}


def count_frames(path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


@pytest.mark.parametrize("kind", ["pt", "darknet", "onnx"])
def test_detect_image_folder_and_video(models, media, tmp_path, kind):
    common = [*models[kind], "--img-size", "64", "--conf-thres", "0.3", "--save-txt"]
    out = tmp_path / "out"
    s = detect.main([*common, "--source", str(media["image"]), "--output", str(out)])
    assert s.frames == 1 and (out / "one.jpg").is_file()
    rows = [r.split() for r in (out / "labels" / "one.txt").read_text().splitlines()]
    assert len(rows) == s.detections > 0
    assert all(len(r) == 6 and all(0 <= float(v) <= 1 for v in r[1:5]) for r in rows)
    s = detect.main([*common, "--source", str(media["folder"]), "--output", str(out)])
    assert s.frames == 3 and s.skipped == [str(media["folder"] / "broken.jpg")]
    assert all((out / f"img{i}.png").is_file() for i in range(3))
    assert (out / "one.jpg").is_file()  # an existing output folder is added to, never emptied
    s = detect.main([*common, "--source", str(media["video"]), "--output", str(out)])
    assert s.frames == 5 == count_frames(out / "clip.mp4")
    assert len(list((out / "labels").glob("clip_*.txt"))) == 5


def test_backends_agree(models, media, tmp_path):
    dets = {}
    for kind, args in models.items():
        s = detect.main([*args, "--img-size", "64", "--conf-thres", "0.3", "--source", str(media["image"]),
                         "--output", str(tmp_path / kind), "--nosave"])
        dets[kind] = s.per_frame[0]
    assert len(dets["pt"]) > 0
    for kind in ("darknet", "onnx"):
        assert dets[kind].shape == dets["pt"].shape
        np.testing.assert_allclose(dets[kind], dets["pt"], atol=1e-2)


def test_default_output_is_a_new_numbered_run_folder(models, media, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = detect.main([*models["pt"], "--source", str(media["image"])])
    b = detect.main([*models["pt"], "--source", str(media["image"])])
    assert a.output.resolve() == tmp_path / "runs" / "detect" / "exp" and b.output.name == "exp2"
    assert (a.output / "one.jpg").is_file()


@pytest.mark.parametrize("case", ["missing source", "unreadable video", "missing weights"])
def test_errors_are_one_line_and_exit_2(models, tmp_path, capsys, case):
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(b"\x00" * 100)
    args = {"missing source": [*models["pt"], "--source", str(tmp_path / "nope.jpg")],
            "unreadable video": [*models["pt"], "--source", str(bad_video)],
            "missing weights": ["--weights", str(tmp_path / "none.pt"), "--source", str(bad_video)]}[case]
    assert run_cli(detect.main, [*args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    named = {"missing source": "nope.jpg", "unreadable video": "bad.mp4", "missing weights": "none.pt"}
    assert named[case] in err
