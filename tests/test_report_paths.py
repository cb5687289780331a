"""Paths in what the project commits and in the report: no machine's absolute paths in the docs, the
recipes or the README; the report names a run's files relative to the run folder (pipeline.report)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import cv2
import pytest

from pipeline import report
from pipeline.report import render, shown_path
from tests.conftest import REPO

# an absolute path of some machine: /tmp/..., /home/..., /work/..., /root/..., /Users/..., C:\Users\...
# (not the tail of a relative path or of a URL: "runs/tmp/" or "github.com/x/work/" do not count)
ABSOLUTE = re.compile(r"(?<![\w.~/-])/(?:tmp|home|work|root|Users)/|\b[A-Za-z]:[\\/]+Users\b", re.IGNORECASE)
DOCS = REPO / "docs" / "compress-default"


def committed_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "docs", "recipes", "README.md"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    files = []
    for name in filter(None, out.split("\0")):
        data = (REPO / name).read_bytes() if (REPO / name).is_file() else b""
        if b"\0" in data[:8192]:  # a binary file (the plots)
            continue
        files.append(REPO / name)
    return files


def absolute_paths(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each line that holds an absolute machine path."""
    return [(k, line.strip()) for k, line in enumerate(text.splitlines(), 1) if ABSOLUTE.search(line)]


def test_the_scan_finds_absolute_paths():
    found = absolute_paths("a\n`/tmp/fresh2/main/recipes/default.yaml`\nsee /home/me/x and C:\\Users\\me\n"
                           "--weights /work/main/last.pt\n/root/x\n/Users/me/y\n")
    assert [k for k, _ in found] == [2, 3, 4, 5, 6]
    assert not absolute_paths("runs/compress/default/report/onnx/baseline.onnx\nhttps://github.com/a/work/b\n"
                              "~/work/x\ndatasets/tmp/y\nC:/Program Files\n")


def test_committed_docs_recipes_and_readme_hold_no_absolute_machine_paths():
    files = committed_text_files()
    assert REPO / "README.md" in files and DOCS / "report.md" in files and DOCS / "report.json" in files
    found = [f"{p.relative_to(REPO)}:{k}: {line}" for p in files
             for k, line in absolute_paths(p.read_text(errors="replace"))]
    assert not found, "absolute machine paths in committed files:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------- shown_path
def test_shown_path_is_relative_to_the_first_folder_that_holds_it(tmp_path):
    project = tmp_path / "project"
    run = project / "runs" / "compress" / "default"
    assert shown_path(run / "baseline" / "weights" / "last.pt", run, project) == "baseline/weights/last.pt"
    assert shown_path(project / "recipes" / "default.yaml", run, project) == "recipes/default.yaml"
    assert shown_path(run, project) == "runs/compress/default"
    assert shown_path(run, run) == "."
    # a user's own file outside both: as given
    assert shown_path(tmp_path / "mine" / "best.pt", run, project) == str(tmp_path / "mine" / "best.pt")
    # a sibling whose name starts like the run folder's is not inside it
    sibling = project / "runs" / "compress" / "default2" / "last.pt"
    assert shown_path(sibling, run, project) == "runs/compress/default2/last.pt"
    assert shown_path(sibling, run) == str(sibling)


def test_shown_path_takes_relative_paths_from_the_current_folder(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "compress" / "default"
    (run / "report").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert shown_path("runs/compress/default/report/a.onnx", "runs/compress/default") == "report/a.onnx"
    assert shown_path(run / "report" / "x.onnx", Path("runs/compress/default")) == "report/x.onnx"
    assert shown_path("elsewhere/x.pt", run) == "elsewhere/x.pt"


def test_shown_path_follows_links_when_one_side_is_resolved(tmp_path):
    real = tmp_path / "real"
    (real / "run" / "a").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert shown_path(real / "run" / "a" / "last.pt", link / "run") == "a/last.pt"


def test_commands_name_project_files_relative_to_the_project():
    last = REPO / "runs" / "compress" / "default" / "baseline" / "last.pt"
    command = f"python train.py --weights {last} --data /data/mine/coco.data --img-size 160"
    assert report._shown_command(command) == ("python train.py --weights runs/compress/default/baseline/"
                                              "last.pt --data /data/mine/coco.data --img-size 160")


# ---------------------------------------------------------------------------------- render
def test_committed_report_is_what_render_makes_of_its_json(tmp_path):
    """docs/compress-default/report.md is rebuilt from its report.json (python -m pipeline.report)."""
    md = render(DOCS / "report.json", tmp_path)
    assert md.read_text() == (DOCS / "report.md").read_text()
    copy = json.loads((tmp_path / "report.json").read_text())
    assert copy == json.loads((DOCS / "report.json").read_text())
    for fig in (report.GFLOPS_PLOT, report.LATENCY_PLOT):
        img = cv2.imread(str(tmp_path / fig))
        assert img is not None and img.shape[0] > 300


def _layout(fig) -> dict:
    """What a reader sees of an accuracy plot: the legend, and per panel its lines' styles, its point
    labels with their boxes on the canvas, and the panel's box."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for t in ax.texts:
            t.update_positions(renderer)  # where the annotation's text goes (drawing does it too)
    return {"legend": [t.get_text() for lg in fig.legends for t in lg.get_texts()],
            "panels": [{"styles": [line.get_linestyle() for line in ax.get_lines()],
                        # the text alone (an annotation's own extent holds its arrow too)
                        "labels": [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts],
                        "box": ax.get_window_extent(renderer)} for ax in fig.axes]}


def test_accuracy_plots_name_every_point_without_overlap_and_draw_no_lines(tmp_path, monkeypatch):
    doc = json.loads((DOCS / "report.json").read_text())
    rows = report._rows(doc)  # finetune, ptq and qat share one GFLOPs and nearly one mAP
    saved = {}
    real = report.save_figure

    def keep(fig, path, **kw):
        saved[Path(path).name] = _layout(fig)
        return real(fig, path, **kw)

    monkeypatch.setattr(report, "save_figure", keep)
    assert report.accuracy_plots(rows, tmp_path) == [report.GFLOPS_PLOT, report.LATENCY_PLOT]
    assert [len(saved[f]["panels"]) for f in (report.GFLOPS_PLOT, report.LATENCY_PLOT)] == [1, 2]
    for name, fig in saved.items():
        assert fig["legend"] == ["mAP@0.5", "mAP@0.5:0.95"], name
        for panel in fig["panels"]:
            assert panel["styles"] and all(s == "None" for s in panel["styles"]), name  # points, no lines
            labels = panel["labels"]
            assert sorted(t for t, _ in labels) == sorted(2 * [r.stage for r in rows]), name
            clash = [(labels[i][0], labels[j][0]) for i in range(len(labels)) for j in range(i)
                     if labels[i][1].overlaps(labels[j][1])]
            assert not clash, f"{name}: overlapping labels {clash}"
            box = panel["box"]
            outside = [t for t, b in labels if not (box.x0 <= b.x0 and b.x1 <= box.x1 + 1 and box.y0 <= b.y0
                                                    and b.y1 <= box.y1 + 1)]
            assert not outside, f"{name}: labels outside the panel {outside}"


def test_render_refuses_what_is_not_a_report(tmp_path):
    from utils.errors import UserError

    with pytest.raises(UserError, match=r"no report\.json"):
        render(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(UserError, match=r"not a compress\.py report"):
        render(tmp_path / "report.json")
