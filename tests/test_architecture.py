"""The layering docs/architecture.md describes, and the questions with one answer: imports go one way,
onnxruntime sessions and latencies come from one place each, and every script picks the same image size."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from models.io import save_checkpoint
from tests.conftest import REFERENCE, REPO, tame_model

SCRIPTS = {"train", "test", "detect", "export", "compress", "summary"}  # the top-level scripts
# package -> the packages it may import (itself always)
ALLOWED = {
    "utils": {"models"},
    "models": {"utils"},
    "engine": {"models", "utils"},
    "prune": {"engine", "models", "utils"},
    "distill": {"engine", "models", "utils"},
    "quant": {"engine", "models", "utils"},
    "deploy": {"quant", "models", "utils"},
    "stages": {"engine", "prune", "distill", "quant", "deploy", "models", "utils"},
    "pipeline": {"stages", "engine", "prune", "distill", "quant", "deploy", "models", "utils"},
    "bench": {"pipeline", "stages", "engine", "prune", "distill", "quant", "deploy", "models", "utils"},
}


def imported_modules(source: str) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def violations(package: str, source: str) -> list[str]:
    bad = []
    for module in sorted(imported_modules(source)):
        top = module.split(".")[0]
        if top in SCRIPTS:
            bad.append(f"imports the script {module}.py")
        elif top in ALLOWED and top != package and top not in ALLOWED[package]:
            bad.append(f"imports {module} ({package}/ may import {', '.join(sorted(ALLOWED[package]))})")
    return bad


def test_imports_go_one_way():
    found = []
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name.endswith("_prune.py"):  # the six prune scripts are scripts themselves
                continue
            found += [f"{path.relative_to(REPO)}: {v}" for v in violations(package, path.read_text())]
    assert not found, found


def test_the_import_check_catches_each_kind_of_violation():
    assert violations("models", "from prune.engine import prune_channels") != []
    assert violations("engine", "def f():\n    from quant.hook import QuantHook\n") != []
    assert violations("pipeline", "import train") != []
    assert violations("stages", "from engine.trainer import Trainer\nimport models.io") == []


def test_onnxruntime_sessions_are_opened_in_one_place():
    """models.onnx.ort_session sets the timing options (denormals flushed, spinning only on request)."""
    found = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
             if ".venv" not in p.parts and "tests" not in p.parts and p != REPO / "models" / "onnx.py"
             and "InferenceSession(" in p.read_text()]
    assert not found, found


def test_the_reference_cfgs_are_present():
    """The parametrized cfg tests include ../shared/reference/darknet-cfg; without it they would
    silently test fewer cfgs."""
    assert REFERENCE.is_dir() and list(REFERENCE.glob("*.cfg")), f"{REFERENCE} is missing"


# ------------------------------------------------------------------------ one image-size precedence

@pytest.fixture(scope="module")
def at_160(tmp_path_factory):
    """A yolo-small checkpoint trained at 160 (its cfg says 224)."""
    d = tmp_path_factory.mktemp("at160")
    pt = d / "m.pt"
    save_checkpoint(pt, tame_model(REPO / "cfg" / "yolo-small.cfg"), img_size=160)
    return pt


def test_every_script_uses_the_checkpoint_size_when_none_is_given(at_160, shapes_data, tmp_path, capsys):
    import detect
    import export
    import summary
    import test as test_script
    from prune import cli
    from quant import ptq

    r = test_script.main(["--weights", str(at_160), "--data", str(shapes_data), "--project", str(tmp_path),
                          "--workers", "0", "--conf-thres", "0.5"])
    assert r.n_images == 4 and "speed per image at 160" in capsys.readouterr().out
    images = shapes_data.parent / "images" / "val"
    assert detect.main(["--weights", str(at_160), "--source", str(images), "--nosave",
                        "--output", str(tmp_path / "d")]).img_size == 160
    onnx = export.main(["--weights", str(at_160), "--output", str(tmp_path / "e")])[0]
    import onnx as onnx_lib

    meta = {p.key: p.value for p in onnx_lib.load(str(onnx)).metadata_props}
    assert json.loads(meta["img_size"]) == [160, 160]
    report = cli.main("normal", ["--weights", str(at_160), "--output", str(tmp_path / "p"),
                                 "--latency-runs", "1"])
    assert report["img_size"] == 160
    assert ptq.main(["--weights", str(at_160), "--data", str(shapes_data), "--images", "4",
                     "--output", str(tmp_path / "q")])["img_size"] == 160
    capsys.readouterr()
    summary.main(["--weights", str(at_160)])
    assert "GFLOPs at 160x160" in capsys.readouterr().out
    assert Path(tmp_path / "p" / "pruned.pt").is_file()
