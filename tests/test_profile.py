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
