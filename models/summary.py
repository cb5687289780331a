"""Model summary: parameters (true millions), GFLOPs (2 × multiply-accumulates) and a layer table; and
the one way the suite measures CPU latency (:func:`latencies`, :func:`measure`; onnxruntime's:
:func:`ort_latencies`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.darknet import Darknet
from models.layers import conv_macs
from models.shapes import Shape, infer_shapes
from utils.torch_utils import alternating_times


@dataclass(frozen=True)
class LayerRow:
    index: int
    type: str
    inputs: tuple[int, ...]
    c_in: int
    out: Shape
    params: int
    macs: int


@dataclass(frozen=True)
class Summary:
    rows: list[LayerRow]
    params: int
    img_size: int

    @property
    def gflops(self) -> float:
        """2 × MACs / 1e9 at ``img_size`` (convolutions; pooling and additions are not counted)."""
        return 2 * sum(r.macs for r in self.rows) / 1e9

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'type':<15}{'from':<14}{'in':>6}{'out':>6}  {'output':<14}"
                 f"{'params':>11}{'GFLOPs':>9}"]
        for r in self.rows:
            src = ",".join(str(j) for j in r.inputs)
            lines.append(f"{r.index:>5}  {r.type:<15}{src:<14}{r.c_in:>6}{r.out.c:>6}  "
                         f"{f'{r.out.h}x{r.out.w}':<14}{r.params:>11,}{2 * r.macs / 1e9:>9.3f}")
        return "\n".join(lines)

    def line(self) -> str:
        return (f"{len(self.rows)} layers, {self.params / 1e6:.3f} M parameters, "
                f"{self.gflops:.3f} GFLOPs at {self.img_size}x{self.img_size}")


def summarize(model: Darknet, img_size: int | None = None) -> Summary:
    """Per-layer shapes, parameters and MACs of ``model`` for a square ``img_size`` input."""
    size = img_size or model.cfg.net["height"]
    shapes = infer_shapes(model.cfg, size, size)
    image = Shape(model.cfg.net["channels"], size, size)
    rows = []
    for i, (block, srcs, layer) in enumerate(zip(model.cfg.layers, model.inputs, model.layers)):
        c_in = (shapes[srcs[0]] if srcs[0] >= 0 else image).c
        macs = conv_macs(block, c_in, shapes[i]) if block.type == "convolutional" else 0
        params = sum(p.numel() for p in layer.parameters())
        rows.append(LayerRow(i, block.type, srcs, c_in, shapes[i], params, macs))
    return Summary(rows, sum(p.numel() for p in model.parameters()), size)


def as_deployed(model: Darknet) -> Darknet:
    """``model`` as it runs in deployment, in eval mode: a copy of a float model made ready by
    :meth:`Darknet.deploy` (batch norms folded, activations in place, channels-last); a quantized
    model as it is (its fake-quant graph)."""
    if model.quant_config is None:
        copy = Darknet(model.cfg)
        copy.load_state_dict(model.state_dict())
        model = copy.deploy()
    return model.eval()


def torch_call(model: Darknet, img_size: int) -> Callable[[], object]:
    """One batch-1 CPU forward of ``model`` as deployed (:func:`as_deployed`) on a fixed random image:
    what latency is measured on."""
    model = as_deployed(model)
    x = torch.rand(1, model.cfg.net["channels"], img_size, img_size,
                   generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def run():
        return model(x)

    return run


def latencies(calls: list[Callable[[], object]], runs: int, warmup: int = 3) -> list[float]:
    """Median milliseconds of each call, timed in alternation (drift hits all alike), with denormals
    flushed to zero as deployment runtimes do: sparse-trained weights make denormal activations, which
    slow x86 float math (measured 1.26x on a sparse yolo-small in PyTorch). Every latency the suite
    reports (the prune scripts, the compress report, the benchmarks) is measured here."""
    return [statistics.median(t) for t in latency_samples(calls, runs, warmup)]


def latency_samples(calls: list[Callable[[], object]], runs: int, warmup: int = 3) -> list[list[float]]:
    """The milliseconds of every timed round of each call (see :func:`latencies`)."""
    torch.set_flush_denormal(True)
    try:
        return alternating_times(calls, runs, warmup)
    finally:
        torch.set_flush_denormal(False)


def ort_latencies(models: Sequence[str | Path | bytes], x, runs: int, warmup: int = 3,
                  configs: Sequence[dict[str, str] | None] | None = None, blocks: int = 3) -> list[float]:
    """Median batch-1 milliseconds of each ONNX model (a path or the bytes) on input ``x`` (a numpy
    array) in onnxruntime as deployed: with its default threading, whose idle worker threads spin
    between calls. Without spinning, every op pays a thread wake-up, which weighs more the smaller the
    model (on the project's 2-core Xeon, 2026-12-04: 1.12x on yolo-small at 224, 1.20x on its 80 %
    slim cut, 1.40x on that cut in INT8). A spinning session slows any other that runs meanwhile, so
    one is alive at a time: in each of ``blocks`` rounds, every model's session is opened in turn
    (``configs``: its extra session entries), warmed up, timed for its share of the ``runs`` calls
    and closed, so drift hits all alike. Denormals are flushed (a session option)."""
    blocks = max(1, min(blocks, runs))
    samples: list[list[float]] = [[] for _ in models]
    for b in range(blocks):
        n = runs // blocks + (b < runs % blocks)  # ``runs`` calls in all
        for k, model in enumerate(models):
            samples[k] += _session_times(model, configs[k] if configs else None, x, n, warmup)
    return [statistics.median(t) for t in samples]


def _session_times(model: str | Path | bytes, config: dict[str, str] | None, x, runs: int,
                   warmup: int) -> list[float]:
    """The milliseconds of ``runs`` calls of a fresh spinning session, closed on return (its threads
    stop before the next one starts)."""
    from models.onnx import ort_session

    sess = ort_session(model, config=config, spinning=True)
    feed = {sess.get_inputs()[0].name: x}
    return alternating_times([lambda: sess.run(None, feed)], runs, warmup)[0]


@dataclass(frozen=True)
class RatioSpread:
    """The latency ratio of two models timed in alternation: the median of the per-round ratios and
    their quartiles; ``wide`` when the quartiles lie more than 20 % apart (a busy machine)."""
    median: float
    q1: float
    q3: float

    @property
    def wide(self) -> bool:
        return (self.q3 - self.q1) > 0.2 * self.median

    def __str__(self) -> str:
        return f"{self.median:.3f} (quartiles {self.q1:.3f}-{self.q3:.3f})"


def ratio_spread(base: Sequence[float], other: Sequence[float]) -> RatioSpread:
    """``other``/``base`` per round (rounds timed in alternation share the machine's state)."""
    ratios = sorted(o / b for b, o in zip(base, other))
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return RatioSpread(med, q1, q3)


@dataclass(frozen=True)
class Measurement:
    params: int
    gflops: float
    latency_ms: float
    latency_samples: tuple[float, ...] = ()  # every timed round, in the order timed


def measure(models: list[Darknet], img_size: int, runs: int, warmup: int = 3) -> list[Measurement]:
    """Parameters, GFLOPs and batch-1 CPU latency (median, the models timed in alternation)."""
    samples = latency_samples([torch_call(m, img_size) for m in models], runs, warmup)
    out = []
    for m, times in zip(models, samples):
        s = summarize(m, img_size)
        out.append(Measurement(s.params, s.gflops, statistics.median(times), tuple(times)))
    return out


def cpu_description() -> str:
    """The processor a latency was measured on: its model name and the vector extensions that decide
    integer kernels' speed (VNNI: int8 dot products in one instruction; AVX2 alone: emulated)."""
    import platform
    from pathlib import Path

    name, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    if "avx512_vnni" in flags:
        simd = "AVX512-VNNI"
    elif "avx_vnni" in flags:
        simd = "AVX-VNNI"
    elif "avx2" in flags:
        simd = "AVX2, no VNNI"
    else:
        simd = "no AVX2" if flags else "extensions unknown"
    return f"{name} ({simd})"
