"""The benchmarks' own logic: the distillation benchmark's arithmetic (seed summaries, the share of the
gap a strategy closes), bench.speed end to end and its ratios, and the up-front --hyp check of the
benchmarks that train."""

import pytest

from bench.distill import gap_recovered, summarize


def test_summarize_gives_mean_and_half_range():
    assert summarize([0.10, 0.14]) == pytest.approx((0.12, 0.02))
    assert summarize([0.2]) == (0.2, 0.0)


def test_gap_recovered_is_the_share_of_teacher_minus_plain():
    teacher, plain = {"map": 0.135}, {"map": 0.079}
    assert gap_recovered({"map": 0.107}, plain, teacher) == pytest.approx(0.5)
    assert gap_recovered({"map": 0.072}, plain, teacher) == pytest.approx(-0.125)
    assert gap_recovered(plain, plain, teacher) is None  # the plain row itself
    assert gap_recovered({"map": 0.1}, None, teacher) is None
    assert gap_recovered({"map": 0.1}, {"map": 0.2}, teacher) is None  # no gap to recover


def test_speed_table_divides_the_latency_ratio_by_the_gflops_ratio():
    from bench.speed import markdown

    result = {224: {"ort_ms_before": 4.0, "ort_ms_after": 2.0, "torch_ms_before": 8.0, "torch_ms_after": 6.0}}
    row = markdown(result, {224: (1.2, 0.3)}, 30).strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["224", "1.200 / 0.300 (0.25)", "4.00 / 2.00", "0.50 (2.00)",
                     "8.00 / 6.00", "0.75 (3.00)"]


def test_speed_times_two_real_checkpoints_in_both_runtimes(tmp_path, capsys, monkeypatch):
    """bench.speed end to end: a quarter-width yolo-small against yolo-small at 64 px, ONNX files in a
    temporary folder that does not outlive the run."""
    import tempfile

    from bench import speed
    from bench.capacity import scaled_cfg
    from models.darknet import Darknet
    from models.io import save_checkpoint
    from tests.conftest import REPO, tame_model
    from utils.torch_utils import tame_random_weights

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where bench.speed's ONNX files go
    before, after = tmp_path / "before.pt", tmp_path / "after.pt"
    save_checkpoint(before, tame_model(REPO / "cfg" / "yolo-small.cfg"))
    save_checkpoint(after, tame_random_weights(Darknet(scaled_cfg("yolo-small-w0.25")), seed=0, img_size=64))
    result = speed.main(["--before", str(before), "--after", str(after), "--sizes", "64", "--runs", "3"])
    assert list(result) == [64]
    assert all(v > 0 for v in result[64].values()) and len(result[64]) == 4
    row = capsys.readouterr().out.strip().splitlines()[-1]
    g0, g1 = (float(v) for v in row.split("|")[2].split("(")[0].split("/"))
    assert g1 < g0 / 4  # the narrow model's compute, counted at 64 px
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after.pt", "before.pt", "tmp"]
    assert not any(scratch.iterdir())  # the ONNX files went to a temporary folder, now removed


def test_speed_times_a_cut_given_as_a_cfg_against_a_checkpoint(tmp_path, capsys):
    """--after a .cfg: the cut is timed with tame random weights, its GFLOPs counted from the cfg."""
    from bench import speed
    from bench.capacity import scaled_cfg
    from models.cfg import write_cfg
    from models.io import save_checkpoint
    from tests.conftest import REPO, tame_model

    before, after = tmp_path / "before.pt", tmp_path / "quarter.cfg"
    save_checkpoint(before, tame_model(REPO / "cfg" / "yolo-small.cfg"))
    after.write_text(write_cfg(scaled_cfg("yolo-small-w0.25")))
    result = speed.main(["--before", str(before), "--after", str(after), "--sizes", "64", "--runs", "3"])
    assert all(v > 0 for v in result[64].values()) and len(result[64]) == 4
    row = capsys.readouterr().out.strip().splitlines()[-1]
    g0, g1 = (float(v) for v in row.split("|")[2].split("(")[0].split("/"))
    assert g1 < g0 / 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before.pt", "quarter.cfg"]


def test_speed_times_pytorch_on_the_threads_asked_for_and_restores_them(tmp_path, capsys):
    import torch

    from bench import speed
    from models.io import save_checkpoint
    from tests.conftest import REPO, tame_model

    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, tame_model(REPO / "cfg" / "yolo-small.cfg"))
    before = torch.get_num_threads()
    asked = 2 if before == 1 else 1  # differs from the current count (test workers may run on one thread)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda *_: seen.append(torch.get_num_threads()))
    try:
        speed.main(["--before", str(ckpt), "--after", str(ckpt), "--sizes", "64", "--runs", "2",
                    "--torch-threads", str(asked)])
    finally:
        handle.remove()
    assert seen and set(seen) == {asked}  # every timed PyTorch forward ran on the threads asked for
    assert torch.get_num_threads() == before
    assert f"alternating, {asked} thread" in capsys.readouterr().out


@pytest.mark.parametrize("bench", ["distill", "prune_methods", "sparsity"])
def test_a_bad_hyp_is_one_line_before_any_work(bench, tmp_path, capsys):
    import importlib

    from utils.cli import run_cli

    module = importlib.import_module(f"bench.{bench}")
    bad = tmp_path / "hyp.yaml"
    bad.write_text("lr0: 0.01\nno_such_key: 1\n")
    argv = ["--hyp", str(bad), "--project", str(tmp_path / "runs")]
    argv += (["--student", "s.pt", "--teacher", "t.pt"] if bench == "distill" else ["--weights", "s.pt"])
    assert run_cli(module.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --hyp {bad}: unknown keys ['no_such_key']")
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained


def test_strategy_rows_name_an_ablation_or_fail_in_one_line(capsys):
    from bench.distill import build_parser, row_name

    a = build_parser().parse_args(["--student", "s.pt", "--teacher", "t.pt",
                                   "--strategies", "0", "6", "6:kd-feat=0,kd_box=0.5"])
    assert a.strategies == [(0, {}), (6, {}), (6, {"kd_feat": 0.0, "kd_box": 0.5})]
    assert row_name(*a.strategies[2]).endswith("), kd-feat 0, kd-box 0.5")
    assert row_name(0, {}) == "no distillation"
    for bad, says in (("7", "strategy 7 does not exist"), ("6:kd-bogus=1", "'kd-bogus' is not one of"),
                      ("6:kd-feat=x", "kd-feat: 'x' is not a number in [0,"),
                      ("6:kd-t=0", "kd-t: 0 is not a number in (0,"),
                      ("0:kd-feat=1", "plain fine-tuning (0) has no distillation weights")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--student", "s", "--teacher", "t", "--strategies", bad])
        assert says in capsys.readouterr().err


def test_widths_times_every_step_th_width_in_both_runtimes_and_writes_its_table(tmp_path, capsys):
    from bench.widths import main

    rows = main(["--widths", "8", "24", "--step", "8", "--size", "8", "--runs", "2",
                 "--project", str(tmp_path)])
    assert [r["width"] for r in rows] == [8, 16, 24]
    assert all(r["ort_ms"] > 0 and r["pt_ms"] > 0 and r["macs"] == r["width"] ** 2 * 9 * 64 for r in rows)
    (table,) = tmp_path.glob("widths*/widths.md")
    assert [line.split("|")[1].strip() for line in table.read_text().splitlines()[4:7]] == ["8", "16", "24"]
