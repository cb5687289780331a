"""TensorRT engines from the exported ONNX, through the TensorRT Python API.

``tensorrt`` exists on the Jetson (JetPack) and on x86 machines with TensorRT installed, not here;
without it :func:`build_engine` stops with one line that names the ``trtexec`` command doing the same
build on the target. An INT8 engine comes from the Q/DQ ONNX (explicit quantization: the scales are
the checkpoint's, no calibration cache); the FP16 flag is set with it, so the layers the Q/DQ graph
leaves float (the head convs and the decode, by default) run in half precision.
"""

from __future__ import annotations

from pathlib import Path

from utils.errors import CheckError, UserError
from utils.outputs import atomic_write

PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE = 2 << 30  # bytes the builder may use for tactics


def _input_shape(onnx_path: Path) -> tuple[str, list[int | str]]:
    import onnx

    inp = onnx.load(str(onnx_path), load_external_data=False).graph.input[0]
    return inp.name, [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]


def _shapes(onnx_path: Path, batch: int, hw: tuple[int, int]) -> tuple[str, dict[str, str] | None]:
    """The input name and, for a dynamic ONNX, min/opt/max shapes (batch 1..``batch``, ``hw``)."""
    name, dims = _input_shape(onnx_path)
    if all(isinstance(d, int) and d > 0 for d in dims):
        return name, None
    h, w = hw
    return name, {"min": f"1x3x{h}x{w}", "opt": f"{batch}x3x{h}x{w}", "max": f"{batch}x3x{h}x{w}"}


def trtexec_command(onnx_path: Path, engine_path: Path, precision: str, batch: int, hw: tuple[int, int]
                    ) -> str:
    """The ``trtexec`` line that builds the same engine (what a Jetson user runs)."""
    flags = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}[precision]
    name, shapes = _shapes(onnx_path, batch, hw)
    if shapes:
        flags += [f"--{k}Shapes={name}:{v}" for k, v in shapes.items()]
    return " ".join(["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", *flags])


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16", batch: int = 1,
                 hw: tuple[int, int] = (416, 416)) -> Path:
    """Build and write ``engine_path`` from ``onnx_path``; returns it."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"engine: the tensorrt Python package is not installed here, so {onnx_path} is kept "
                        f"and no engine is built; on the Jetson run: "
                        f"{trtexec_command(onnx_path, engine_path, precision, batch, hw)}") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # explicit batch: a flag before TensorRT 10, the only mode since
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    else:  # TensorRT < 8.4
        config.max_workspace_size = WORKSPACE
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the Q/DQ scales, no calibrator
    name, shapes = _shapes(onnx_path, batch, hw)
    if shapes:
        profile = builder.create_optimization_profile()
        dims = [tuple(int(v) for v in shapes[k].split("x")) for k in ("min", "opt", "max")]
        profile.set_shape(name, *dims)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise CheckError(f"{onnx_path}: TensorRT could not build a {precision} engine (see its log above)")
    return atomic_write(engine_path, bytes(engine))
