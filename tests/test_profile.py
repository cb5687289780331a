"""Per-layer CPU time: the profiler attributes time to the layer that spends it, in both runtimes."""

from __future__ import annotations

from models.cfg import parse_cfg
from models.darknet import Darknet
from models.profile import OTHER, layer_times, plot_layer_times
from tests.test_cfg import CONV, HEAD, NET

# layer 2 is a 3x3 conv 96 -> 96 at 64x64 (340 M multiply-adds); every other conv has 6x fewer or less
HEAVY = NET + CONV.format(f=16, s=1) + CONV.format(f=96, s=1) + CONV.format(f=96, s=1) + \
    CONV.format(f=8, s=2) + HEAD.format(f=21)


def test_layer_times_find_the_heavy_layer_in_onnxruntime_and_pytorch(tmp_path):
    model = Darknet(parse_cfg(HEAVY, "heavy.cfg"))
    t = layer_times(model, 64, runs=5, warmup=1)
    convs = [i for i, ty in t.types.items() if ty == "convolutional"]
    assert set(convs) <= set(t.ort_ms) and set(convs) <= set(t.torch_ms)  # every conv is attributed
    for ms in (t.ort_ms, t.torch_ms):
        heaviest = max((k for k in ms if k != OTHER), key=ms.get)
        assert heaviest == 2, ms
        assert ms[2] > 0.5 * sum(ms.values()), ms  # it holds most of the time, as it holds most MACs
    assert max(t.gflops, key=t.gflops.get) == 2
    ort_total, torch_total = t.totals()
    assert ort_total > 0 and torch_total > 0
    rows = t.rows()
    assert [r["layer"] for r in rows] == sorted(r["layer"] for r in rows)
    png = plot_layer_times([("heavy", t), ("again", t)], tmp_path / "layers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]  # no temporary left beside it


# a light model: the heavy one with its 96-wide convs at 8
LIGHT = NET + CONV.format(f=16, s=1) + CONV.format(f=8, s=1) + CONV.format(f=8, s=1) + \
    CONV.format(f=8, s=2) + HEAD.format(f=21)


def test_ort_latencies_time_each_session_alone_as_deployed(tmp_path, monkeypatch):
    """onnxruntime latency: sessions with its default spinning threads, never two alive at once (a
    spinning pool slows the other), and a model with 6x the work measured slower."""
    import gc
    import weakref

    import numpy as np

    import models.onnx
    from models.onnx import export_onnx
    from models.summary import ort_latencies

    paths = [tmp_path / "heavy.onnx", tmp_path / "light.onnx"]
    for cfg, path in zip((HEAVY, LIGHT), paths):
        export_onnx(Darknet(parse_cfg(cfg, path.stem + ".cfg")).eval(), path, 64)
    opened, overlaps, real = [], [], models.onnx.ort_session

    def watched(*args, **kwargs):  # (no garbage collection: a session must be gone by its last reference)
        overlaps.append(sum(ref() is not None for ref in opened))
        sess = real(*args, **kwargs)
        assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
        opened.append(weakref.ref(sess))
        return sess

    monkeypatch.setattr(models.onnx, "ort_session", watched)
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    gc.disable()
    try:
        heavy, light = ort_latencies(paths, x, runs=6, warmup=1, blocks=2)
        assert len(opened) == 4 and overlaps == [0, 0, 0, 0]  # 2 rounds of 2 sessions, one at a time
        assert all(ref() is None for ref in opened)  # the last one too
    finally:
        gc.enable()
    assert heavy > light > 0
    monkeypatch.undo()
    default = models.onnx.ort_session(paths[1])  # every other session does not spin
    assert default.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
