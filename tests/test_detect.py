"""detect.py, export.py, the inference sources and back-ends, on generated images, folders and videos
with the same tame yolo-small as .pt, cfg + darknet .weights and .onnx (fixed and dynamic size)."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest

import detect
import export
from models.backends import load_detector
from models.io import save_checkpoint, save_darknet_weights
from models.onnx import export_onnx
from tests.conftest import REPO, tame_model
from utils.augment import PAD_VALUE
from utils.cli import run_cli
from utils.errors import CheckError, UserError
from utils.sources import expand_source, open_source

NAMES = ["circle", "square", "triangle", "star", "cross", "ring"]
CONF = ["--conf-thres", "0.3"]  # tame random weights: a few boxes per 64 px image score above this


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Command-line arguments for the same model as .pt, cfg + .weights, .onnx (64x64) and dynamic .onnx."""
    d = tmp_path_factory.mktemp("models")
    model = tame_model(REPO / "cfg" / "yolo-small.cfg")
    pt = d / "small.pt"
    save_checkpoint(pt, model, names=NAMES, img_size=64)
    cfg = d / "small.cfg"
    cfg.write_text(model.cfg_text)
    save_darknet_weights(model, d / "small.weights")
    onnx_fixed = export.main(["--weights", str(pt)])[0]  # the checkpoint's size: 64
    onnx_dynamic = export.main(["--weights", str(pt), "--dynamic", "--simplify", "--output",
                                str(d / "dynamic")])[0]
    return {"pt": ["--weights", str(pt)],
            "darknet": ["--weights", str(d / "small.weights"), "--cfg", str(cfg)],
            "onnx": ["--weights", str(onnx_fixed)],
            "onnx-dynamic": ["--weights", str(onnx_dynamic)]}


def noise(rng, h, w):
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    image = d / "one.png"
    cv2.imwrite(str(image), noise(rng, 64, 64))
    folder = d / "folder"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), noise(rng, 64, 64))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.md").write_text("not media")
    video = d / "clip.mp4"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for _ in range(5):
        w.write(noise(rng, 64, 96))
    w.release()
    return {"image": image, "folder": folder, "video": video}


def read_txt(path, hw) -> np.ndarray:
    """A --save-txt file as (n, 6) [x1, y1, x2, y2, conf, cls] in the pixels of an (h, w) image."""
    rows = np.loadtxt(path, ndmin=2).reshape(-1, 6)
    h, w = hw
    c, xc, yc, bw, bh, conf = rows.T
    return np.stack([(xc - bw / 2) * w, (yc - bh / 2) * h, (xc + bw / 2) * w, (yc + bh / 2) * h, conf, c], 1)


def read_video(path) -> tuple[int, tuple[int, int] | None, float]:
    """Frames, (h, w) and frame rate of a video, read back with OpenCV."""
    cap = cv2.VideoCapture(str(path))
    fps, n, shape = cap.get(cv2.CAP_PROP_FPS), 0, None
    while True:
        ok, img = cap.read()
        if not ok:
            break
        n, shape = n + 1, img.shape[:2]
    cap.release()
    return n, shape, fps


def assert_label_rows(path, classes: int, conf_thres: float) -> int:
    rows = [r.split() for r in path.read_text().splitlines()]
    for r in rows:
        assert len(r) == 6 and r[0].isdigit() and int(r[0]) < classes
        assert all(0 <= float(v) <= 1 for v in r[1:5]) and conf_thres < float(r[5]) <= 1
    return len(rows)


@pytest.mark.parametrize("kind", ["pt", "darknet", "onnx"])
def test_detect_image_folder_and_video(models, media, tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("mine")  # an existing output folder is added to, never emptied
    common = [*models[kind], *CONF, "--save-txt", "--output", str(out)]
    s = detect.main([*common, "--source", str(media["image"])])
    assert s.frames == 1 and s.written == [out / "one.png"]
    assert assert_label_rows(out / "labels" / "one.txt", len(NAMES), 0.3) == s.detections > 0
    drawn, original = cv2.imread(str(out / "one.png")), cv2.imread(str(media["image"]))
    assert drawn.shape == original.shape and (drawn != original).any()  # boxes were drawn

    s = detect.main([*common, "--source", str(media["folder"])])
    assert s.frames == 3 and s.skipped == [str(media["folder"] / "broken.jpg")]
    assert all((out / f"img{i}.png").is_file() and (out / "labels" / f"img{i}.txt").is_file()
               for i in range(3))

    s = detect.main([*common, "--source", str(media["video"])])
    assert s.frames == 5 and read_video(out / "clip.mp4") == (5, (64, 96), 10)
    assert sorted(p.name for p in (out / "labels").glob("clip_*.txt")) == [f"clip_{i}.txt" for i in range(5)]
    assert sum(assert_label_rows(p, len(NAMES), 0.3) for p in (out / "labels").glob("clip_*.txt")) \
        == s.detections
    assert (out / "sentinel.txt").read_text() == "mine" and (out / "one.png").is_file()


def detections(args, source, out, *extra) -> np.ndarray:
    detect.main([*args, *CONF, "--source", str(source), "--output", str(out), "--save-txt", "--nosave",
                 *extra])
    txt = out / "labels" / f"{source.stem}.txt"
    return read_txt(txt, cv2.imread(str(source)).shape[:2])


def sort_rows(d: np.ndarray) -> np.ndarray:
    """By class, then x1, y1, x2, y2 rounded to 0.1 px: boxes clipped at an image edge have x1 of
    -5e-5 in one backend and 5e-5 in another, and must still tie so that x2 decides."""
    k = d[:, :4].round(1)
    return d[np.lexsort((k[:, 3], k[:, 2], k[:, 1], k[:, 0], d[:, 5]))]


def test_backends_agree(models, media, tmp_path):
    dets = {kind: sort_rows(detections(args, media["image"], tmp_path / kind, "--img-size", "64"))
            for kind, args in models.items()}
    assert len(dets["pt"]) > 0
    for kind in ("darknet", "onnx", "onnx-dynamic"):
        assert dets[kind].shape == dets["pt"].shape, kind
        np.testing.assert_allclose(dets[kind], dets["pt"], atol=2e-3, err_msg=kind)


def test_dynamic_onnx_runs_rectangular_inputs_like_pytorch(models, media, tmp_path):
    # 96x64 video frames at --img-size 96 stay 64x96 (no padding), a shape the fixed ONNX cannot take
    args = [*CONF, "--img-size", "96", "--source", str(media["video"]), "--save-txt", "--nosave"]
    rows = {}
    for kind in ("pt", "onnx-dynamic"):
        detect.main([*models[kind], *args, "--output", str(tmp_path / kind)])
        rows[kind] = [sort_rows(read_txt(tmp_path / kind / "labels" / f"clip_{i}.txt", (64, 96)))
                      for i in range(5)]
    assert sum(map(len, rows["pt"])) > 0
    for a, b in zip(rows["onnx-dynamic"], rows["pt"]):
        np.testing.assert_allclose(a, b, atol=2e-3)


def test_boxes_map_back_through_resize_and_padding(models, tmp_path):
    rng = np.random.default_rng(1)
    # resize: a 2x nearest-neighbour upscale letterboxes back to exactly the 64x64 image
    small = noise(rng, 64, 64)
    big = cv2.resize(small, (128, 128), interpolation=cv2.INTER_NEAREST)
    # padding: a 32x64 image letterboxed to the fixed ONNX's 64x64 is the same image between grey rows
    wide = noise(rng, 32, 64)
    padded = cv2.copyMakeBorder(wide, 16, 16, 0, 0, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    for name, img in [("small", small), ("big", big), ("wide", wide), ("padded", padded)]:
        cv2.imwrite(str(tmp_path / f"{name}.png"), img)
    frames = {name: next(iter(open_source(str(tmp_path / f"{name}.png"), 64, 32, auto=False)))
              for name in ("small", "big", "wide", "padded")}
    np.testing.assert_array_equal(frames["big"].letterboxed, frames["small"].letterboxed)
    np.testing.assert_array_equal(frames["wide"].letterboxed, frames["padded"].letterboxed)
    assert frames["big"].ratio == (0.5, 0.5) and frames["wide"].pad == (0, 16)

    d = {name: detections(models["onnx"], tmp_path / f"{name}.png", tmp_path / name)
         for name in ("small", "big", "wide", "padded")}
    assert len(d["small"]) > 0 and len(d["padded"]) > 0
    scaled = d["small"].copy()
    scaled[:, :4] *= 2
    np.testing.assert_allclose(d["big"], scaled, atol=1e-3)
    shifted = d["padded"].copy()
    shifted[:, [1, 3]] = (shifted[:, [1, 3]] - 16).clip(0, 32)
    np.testing.assert_allclose(d["wide"], shifted, atol=1e-3)


def test_sources_lists_globs_and_video_frames(media, tmp_path):
    folder = media["folder"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(media["image"].read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text(f"# relative to the list's folder\nsub/a.png\n\n{media['video']}\n")
    assert expand_source(str(listing)) == [str(tmp_path / "sub" / "a.png"), str(media["video"])]
    assert expand_source(str(folder / "img*.png")) == [str(folder / f"img{i}.png") for i in range(3)]
    assert expand_source(str(folder)) == [str(folder / "broken.jpg"), *(str(folder / f"img{i}.png")
                                                                        for i in range(3))]
    frames = list(open_source(str(media["video"]), 96, 32, auto=True))
    assert [f.index for f in frames] == list(range(5))
    f = frames[0]
    assert f.is_video and f.fps == 10 and f.video_size == (96, 64) and f.stem == "clip"
    assert f.letterboxed.shape == (3, 64, 96) and f.letterboxed.flags.c_contiguous
    np.testing.assert_array_equal(f.letterboxed, f.image[:, :, ::-1].transpose(2, 0, 1))  # RGB, CHW
    source = open_source(str(folder), 64, 32, auto=True)
    assert len(list(source)) == 3 and source.skipped == [str(folder / "broken.jpg")]


def test_onnx_metadata_and_simplify(models, tmp_path):
    fixed = load_detector(models["onnx"][1])
    dynamic = load_detector(models["onnx-dynamic"][1])
    assert fixed.names == NAMES == dynamic.names and fixed.classes == len(NAMES) and fixed.stride == 32
    assert fixed.fixed_hw == (64, 64) and dynamic.fixed_hw is None and dynamic.img_size == 64
    proto = onnx.load(models["onnx-dynamic"][1])
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == [
        "detections"]
    assert {o.domain for o in proto.opset_import} == {""}
    plain = export.main([*models["pt"], "--dynamic", "--output", str(tmp_path / "plain")])[0]
    assert len(proto.graph.node) < len(onnx.load(plain).graph.node)  # simplified: constants folded in


def test_one_label_per_box(models, media, tmp_path):
    # at a low threshold several classes of a box pass it; detect keeps only the best one
    d = detections(models["pt"], media["image"], tmp_path, "--conf-thres", "0.02")
    h, w = cv2.imread(str(media["image"])).shape[:2]
    # two predictions can clip to the same box at the image edge; inside it every box is one prediction
    inside = d[(d[:, 0] > 0.5) & (d[:, 1] > 0.5) & (d[:, 2] < w - 0.5) & (d[:, 3] < h - 0.5)]
    assert len(inside) > 10 and len(np.unique(inside[:, :4].round(3), axis=0)) == len(inside)


def test_failed_onnx_check_leaves_no_file(tmp_path):
    model = tame_model(REPO / "cfg" / "yolo-small.cfg")
    with pytest.raises(CheckError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", 64, atol=-1.0)  # no difference can pass a negative bound
    with pytest.raises(UserError, match="multiples of 32"):
        export_onnx(model, tmp_path / "m.onnx", (64, 80))
    assert list(tmp_path.iterdir()) == []


def test_default_output_is_a_new_numbered_run_folder(models, media, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a = detect.main([*models["pt"], "--source", str(media["image"])])
    assert any(name in capsys.readouterr().out for name in NAMES)  # the checkpoint's class names
    b = detect.main([*models["pt"], "--source", str(media["image"])])
    assert a.output.resolve() == tmp_path / "runs" / "detect" / "exp" and b.output.name == "exp2"
    assert (a.output / "one.png").is_file() and (b.output / "one.png").is_file()


def test_names_classes_and_half_options(models, media, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing{i}\n" for i in range(len(NAMES))))
    all_dets = detections(models["pt"], media["image"], tmp_path / "all", "--names", str(names))
    printed = capsys.readouterr().out
    assert "thing" in printed and "circle" not in printed
    keep = int(all_dets[0, 5])
    only = detections(models["pt"], media["image"], tmp_path / "only", "--classes", str(keep))
    np.testing.assert_allclose(only, all_dets[all_dets[:, 5] == keep], atol=1e-6)
    half = detections(models["pt"], media["image"], tmp_path / "half", "--half")
    assert "warning: --half needs CUDA" in capsys.readouterr().out
    np.testing.assert_allclose(sort_rows(half), sort_rows(all_dets), atol=2e-3)


@pytest.mark.parametrize("case", ["missing source", "unreadable video", "unreadable image", "missing weights",
                                  "empty folder", "bad list line", "names count", "class index",
                                  "fixed onnx size", "view-img headless", "export raw int8"])
def test_errors_are_one_line_and_exit_2(models, media, tmp_path, capsys, case):
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(b"\x00" * 100)
    bad_image = tmp_path / "bad.jpg"
    bad_image.write_bytes(b"not a jpeg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_text(f"{media['image']}\ngone.png\n")
    (tmp_path / "two.names").write_text("a\nb\n")
    if case == "view-img headless" and detect.has_gui():
        pytest.skip("this OpenCV build has a GUI")
    image = ["--source", str(media["image"])]
    args, named = {
        "missing source": ([*models["pt"], "--source", str(tmp_path / "nope.jpg")], "nope.jpg"),
        "unreadable video": ([*models["pt"], "--source", str(bad_video)], "bad.mp4"),
        "unreadable image": ([*models["pt"], "--source", str(bad_image)], "bad.jpg"),
        "missing weights": (["--weights", str(tmp_path / "none.pt"), *image], "none.pt"),
        "empty folder": ([*models["pt"], "--source", str(tmp_path / "empty")], "empty"),
        "bad list line": ([*models["pt"], "--source", str(tmp_path / "list.txt")], "list.txt:2"),
        "names count": ([*models["pt"], *image, "--names", str(tmp_path / "two.names")], "two.names"),
        "class index": ([*models["pt"], *image, "--classes", "6"], "--classes 6"),
        "fixed onnx size": ([*models["onnx"], *image, "--img-size", "96"], "--dynamic"),
        "view-img headless": ([*models["pt"], *image, "--view-img"], "--view-img"),
        "export raw int8": ([*models["pt"], "--include", "onnx-int8", "--raw"], "--raw"),
    }[case]
    main = export.main if case.startswith("export") else detect.main
    out = tmp_path / "o"
    assert run_cli(main, [*args, *([] if main is export.main else ["--output", str(out)])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and named in err
    if case not in ("unreadable video", "unreadable image"):  # the rest is found before any output
        assert not out.exists()
