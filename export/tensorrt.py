"""TensorRT engines from the exported ONNX graphs (TensorRT Python API, versions 10 and 11).

- one optimisation profile per graph: batch min 1, opt = preferred batch, max = max batch (and
  the tag count for the head);
- TensorRT 10: weakly typed network, FP16 flag for fp16 with LayerNorm/Softmax layers pinned to
  fp32; TensorRT 11: strongly typed network, precision taken from the graph (export an fp16
  ONNX for an fp16 engine);
- a persisted timing cache, so rebuilding is fast;
- engine file names that carry TensorRT version, GPU compute capability and precision.

TensorRT is imported only when an engine is built; without it the error says how to get it.
The pure parts (profiles, names) are tested on the CPU; the build itself needs an NVIDIA GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ttd.config import ModelConfig


class TensorRTUnavailable(RuntimeError):
    pass


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTUnavailable(
            "TensorRT is not installed: on a machine with an NVIDIA GPU, `pip install tensorrt` "
            "(or use NVIDIA's TensorRT container); it cannot be installed on CPU-only machines"
        ) from error
    return trt


@dataclass(frozen=True)
class BatchLimits:
    opt_batch: int = 8
    max_batch: int = 32
    opt_tags: int = 16
    max_tags: int = 256


def profiles(graph: str, config: ModelConfig, limits: BatchLimits) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes of every input of `graph`."""
    size, dim, ctx = config.image_size, config.embed_dim, config.context_length
    h, w = config.grid_size
    b = (1, limits.opt_batch, limits.max_batch)
    if graph == "image_encoder":
        return {"pixel_values": tuple((n, 3, size, size) for n in b)}
    if graph == "text_encoder":
        # tag prompts arrive in large batches: allow 8x the image batch
        return {"input_ids": tuple((n, ctx) for n in (1, limits.opt_batch * 8, limits.max_batch * 8))}
    if graph == "tag_head":
        k = (1, limits.opt_tags, limits.max_tags)
        return {"patch_embeds": tuple((n, dim, h, w) for n in b),
                "tag_embeds": tuple((n, t, dim) for n, t in zip(b, k))}
    raise ValueError(f"unknown graph {graph!r}")


def engine_name(graph: str, trt_version: str, compute_capability: tuple[int, int], precision: str) -> str:
    """e.g. image_encoder.trt10.13.sm90.fp16.plan"""
    major_minor = ".".join(trt_version.split(".")[:2])
    return f"{graph}.trt{major_minor}.sm{compute_capability[0]}{compute_capability[1]}.{precision}.plan"


def is_strongly_typed(trt_version: str) -> bool:
    return int(trt_version.split(".")[0]) >= 11


def build_engine(onnx_path: Path, out_dir: Path, graph: str, config: ModelConfig, precision: str,
                 limits: BatchLimits, timing_cache: Path, compute_capability: tuple[int, int],
                 workspace_gib: float = 4.0) -> Path:
    """Build and write one engine; returns its path."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = is_strongly_typed(trt.__version__)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed and precision == "fp16":
        builder_config.set_flag(trt.BuilderFlag.FP16)
        builder_config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE):
                layer.precision = trt.float32
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles(graph, config, limits).items():
        profile.set_shape(name, low, opt, high)
    builder_config.add_optimization_profile(profile)
    cache = builder_config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    timing_cache.write_bytes(memoryview(builder_config.get_timing_cache().serialize()))
    path = out_dir / engine_name(graph, trt.__version__, compute_capability, precision)
    path.write_bytes(memoryview(serialized))
    return path


def build_engines(export_dir: Path, config: ModelConfig, precision: str, limits: BatchLimits) -> dict[str, Path]:
    """Engines for the three graphs of an export directory, beside them."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("building TensorRT engines needs an NVIDIA GPU; none is visible")
    capability = torch.cuda.get_device_capability()
    cache = export_dir / "tensorrt.timing_cache"
    return {g: build_engine(export_dir / f"{g}.onnx", export_dir, g, config, precision, limits, cache, capability)
            for g in ("image_encoder", "text_encoder", "tag_head")}
