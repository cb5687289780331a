"""The write rule (utils/outputs.py): atomic writes survive a kill, stale temporaries are cleaned, a plan
refuses inputs and existing files before the first write, a full disk is one line, and no project code
writes a file any other way."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from models.io import load_checkpoint, save_checkpoint
from tests.conftest import REPO, tame_model
from utils.cli import run_cli
from utils.errors import UserError
from utils.outputs import (
    NoSpaceError,
    OutputPlan,
    atomic_path,
    atomic_write,
    clean_stale_temps,
    is_temp,
    temp_name,
)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    f = atomic_write(tmp_path / "results.csv", "epoch\n0\n")

    def half(fh):
        fh.write(b"epoch\n0\n1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(f, half)
    assert f.read_text() == "epoch\n0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_killed_writer_leaves_the_previous_file_and_the_next_run_removes_its_temporary(tmp_path):
    """SIGKILL in the middle of a write (no Python cleanup runs): the old file is whole, and the
    temporary is recognised and removed the next time a run plans its outputs in that folder."""
    target = tmp_path / "weights" / "last.pt"
    target.parent.mkdir()
    target.write_bytes(b"complete epoch 3")
    code = textwrap.dedent(f"""
        import sys, time
        from utils.outputs import atomic_write
        def slow(f):
            f.write(b"half of epoch 4")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(target)!r}, slow)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert target.read_bytes() == b"complete epoch 3"
    left = [f for f in target.parent.iterdir() if f != target]
    assert len(left) == 1 and is_temp(left[0]) and left[0].name.startswith(".last.pt.")
    user_file = target.parent / ".notes.tmp"  # a user's dot-file is not ours
    user_file.write_text("keep")
    plan = OutputPlan([], exist_ok=True)
    plan.add(target)
    plan.check()
    assert sorted(f.name for f in target.parent.iterdir()) == [".notes.tmp", "last.pt"]


def test_temporary_names_keep_the_suffix_and_are_recognised(tmp_path):
    t = temp_name(tmp_path / "x.jpg")
    assert t.suffix == ".jpg" and t.name.startswith(".x.jpg.") and is_temp(t)
    assert not is_temp(tmp_path / ".x.jpg") and not is_temp(tmp_path / "x.tmp")
    (tmp_path / "keep.tmp").write_text("user")
    t.write_text("stale")
    assert clean_stale_temps(tmp_path) == [t]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tmp"]


def test_a_plan_refuses_inputs_always_and_existing_files_without_the_flag(tmp_path):
    src, old = tmp_path / "in.pt", tmp_path / "old.onnx"
    src.write_bytes(b"in")
    old.write_bytes(b"old")
    plan = OutputPlan([src], exist_ok=False)
    plan.add(tmp_path / "new.onnx")
    plan.check()  # nothing there yet
    plan.add(old)
    with pytest.raises(UserError, match=r"old.onnx.*exists; pass --exist-ok"):
        plan.check()
    plan = OutputPlan([src], exist_ok=True)
    plan.add(old)
    plan.check()
    plan.add(tmp_path / "sub" / ".." / "in.pt")  # the same file under another name
    with pytest.raises(UserError, match="would overwrite the input"):
        plan.check()
    link = tmp_path / "link.pt"
    os.link(src, link)
    plan = OutputPlan([src], exist_ok=True)
    plan.add(link)
    with pytest.raises(UserError, match="would overwrite the input"):
        plan.check()
    plan = OutputPlan()
    plan.add(tmp_path / "a.txt", "labels of a.jpg")
    with pytest.raises(UserError, match=r"both labels of a\.jpg and labels of a\.png"):
        plan.add(tmp_path / "a.txt", "labels of a.png")
    assert src.read_bytes() == b"in" and old.read_bytes() == b"old"


def test_a_folder_is_replaced_only_when_it_is_ours(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for d in (ours, theirs):
        d.mkdir()
        (d / "a").write_text("old")
    (ours / "mark").write_text("")
    replaceable = lambda d: (d / "mark").exists()  # noqa: E731
    for exist_ok in (False, True):
        plan = OutputPlan(exist_ok=exist_ok, replaceable=replaceable)
        plan.add(theirs)
        with pytest.raises(UserError, match="theirs"):
            plan.check()
    plan = OutputPlan(exist_ok=True, replaceable=replaceable)
    plan.add(ours)
    plan.check()
    with atomic_path(ours, folder=True) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in ours.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "theirs"]
    assert (theirs / "a").read_text() == "old"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs: a real full disk (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_line_naming_the_folder_and_keeps_the_old_file(tiny_disk, tmp_path, capsys):
    model = tame_model(REPO / "cfg" / "yolov3-tiny.cfg")  # 35 MB of weights: cannot fit
    small = tame_model(REPO / "tests" / "data" / "more-activations.cfg")
    target = tiny_disk / "last.pt"
    save_checkpoint(target, small)
    before = target.read_bytes()
    with pytest.raises(NoSpaceError, match=f"no space left on {tiny_disk} while writing last.pt"):
        save_checkpoint(target, model)
    assert target.read_bytes() == before and [p.name for p in tiny_disk.iterdir()] == ["last.pt"]
    load_checkpoint(target)
    # a script: exit 2 and one line, no traceback
    import export

    pt = tmp_path / "m.pt"
    save_checkpoint(pt, model)
    assert run_cli(export.main, ["--weights", str(pt), "--output", str(tiny_disk / "m"),
                                 "--include", "weights"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on" in err
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["last.pt", "m.cfg"]  # the cfg fitted


# ---------------------------------------------------------------------------------- no other writers

WRITE_METHODS = {"write_text", "write_bytes", "savefig", "imwrite", "savez", "savez_compressed", "symlink_to",
                 "hardlink_to"}
MOVES = {"rename", "replace"}  # Path.replace(target) has one argument, str.replace two
WRITE_FUNCTIONS = {("torch", "save"), ("np", "save"), ("numpy", "save"), ("onnx", "save"), ("os", "rename"),
                   ("os", "replace"), ("os", "link"), ("onnx", "export"),
                   *(("shutil", f) for f in ("copy", "copy2", "copyfile", "copytree", "move"))}
MARK = "into a temporary"  # a comment saying the target is a temporary that utils.outputs renames


def _raw_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f, what = node.func, None
        if isinstance(f, ast.Attribute):
            base = f.value.attr if isinstance(f.value, ast.Attribute) else getattr(f.value, "id", "")
            if (base, f.attr) in WRITE_FUNCTIONS:
                what = f"{base}.{f.attr}"
            elif f.attr in WRITE_METHODS or (f.attr in MOVES and len(node.args) == 1 and not node.keywords):
                what = f.attr
            elif f.attr == "open":
                what = "open"
        elif isinstance(f, ast.Name) and f.id == "open":
            what = "open"
        if what == "open":
            mode = next((a.value for a in node.args
                         if isinstance(a, ast.Constant) and isinstance(a.value, str)), None)
            mode = next((k.value.value for k in node.keywords if k.arg == "mode"), mode)
            if not mode or not any(c in mode for c in "wx+"):
                continue
        if what is None:
            continue
        text = " ".join(lines[node.lineno - 2:node.end_lineno])
        if MARK not in text:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {what}")
    return found


def test_no_project_code_writes_a_file_except_through_utils_outputs():
    """Every writer goes through utils/outputs.py (atomic, checked). A library that must be given a
    path writes into an atomic_path temporary, said by a comment on the call."""
    files = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts
             and p != REPO / "utils" / "outputs.py"]
    found = [w for p in sorted(files) for w in _raw_writes(p)]
    assert not found, found
    # the scan finds what it looks for
    probe = REPO / "tests" / "data" / "make_trained_detections.py"
    assert _raw_writes(probe)  # np.savez of a test fixture generator, outside the project code
