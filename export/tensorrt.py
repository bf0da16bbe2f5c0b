"""TensorRT engines from the exported ONNX graphs (TensorRT Python API, versions 10 and 11).

- strongly typed networks on every version: each precision variant already carries its types
  in its ONNX graph (fp16 casts with LayerNorm/Softmax kept fp32, bf16 weights, an fp32 tag
  head), so no precision flag is set and nothing is re-typed behind the graph's back (weak
  typing is deprecated since TensorRT 10.12 and gone in 11);
- int8 is refused before any work: onnxruntime's dynamic quantisation writes
  DynamicQuantizeLinear/MatMulInteger, which TensorRT's ONNX parser lacks, and its static QDQ
  uses non-zero activation zero points, where TensorRT needs symmetric ones;
- one optimisation profile per graph: batch min 1, opt = preferred batch, max = max batch (and
  the tag count for the head); the limits are recorded in the manifest, so a Triton repository
  and the runtime can stay inside them;
- a timing cache kept outside the export directory (the user's cache folder, one file per
  TensorRT version and GPU), so rebuilding is fast and the export's hashed files never change
  after the manifest is written;
- engine file names that carry TensorRT version, GPU compute capability and precision.

TensorRT is imported only when an engine is built; without it the error says how to get it.
The pure parts are tested on the CPU (with a stand-in for the tensorrt module); the build
itself needs an NVIDIA GPU.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ttd.errors import InputError, RuntimeProblem, TTDError
from ttd.model.config import ModelConfig
from ttd.model.contract import GRAPH_NAMES, GRAPHS
from ttd.runtime.tensorrt_backend import engine_name

MIN_TENSORRT_MAJOR = 10


class TensorRTUnavailable(TTDError, RuntimeError):
    pass


class TensorRTUnsupported(TTDError, ValueError):
    """An export option that no TensorRT engine can be built from."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTUnavailable(
            "TensorRT is not installed: on a machine with an NVIDIA GPU, `pip install tensorrt` "
            "(or use NVIDIA's TensorRT container); it cannot be installed on CPU-only machines"
        ) from error
    major = int(trt.__version__.split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: ttd builds strongly typed engines "
                                  f"with the TensorRT {MIN_TENSORRT_MAJOR} API; install TensorRT 10 or newer")
    return trt


def check_precision(precision: str) -> None:
    """Refuse what TensorRT's ONNX parser cannot take, before anything is exported."""
    if precision == "int8":
        raise TensorRTUnsupported(
            "--precision int8 cannot be built into TensorRT engines: onnxruntime's int8 graphs use "
            "DynamicQuantizeLinear/MatMulInteger (dynamic) or asymmetric QDQ (static), which TensorRT's ONNX "
            "parser rejects. Export int8 without --tensorrt for onnxruntime, or use --precision fp16 or bf16 "
            "with --tensorrt")


def preflight(precision: str) -> tuple[str, tuple[int, int]]:
    """Everything an engine build needs, checked before the export starts: (TensorRT version,
    GPU compute capability)."""
    check_precision(precision)
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("building TensorRT engines needs an NVIDIA GPU; none is visible")
    return trt.__version__, tuple(torch.cuda.get_device_capability())


@dataclass(frozen=True)
class BatchLimits:
    opt_batch: int = 8
    max_batch: int = 256  # the batch `ttd tag` runs on a data-centre GPU
    opt_tags: int = 16
    max_tags: int = 1024  # what the Triton tagger accepts per request by default

    def __post_init__(self) -> None:
        if not 1 <= self.opt_batch <= self.max_batch:
            raise InputError(f"TensorRT profile: --opt-batch {self.opt_batch} must lie in 1..--max-batch {self.max_batch}")
        if self.max_tags < 1 or self.opt_tags < 1:
            raise InputError(f"TensorRT profile: tag counts must be at least 1 (got opt {self.opt_tags}, "
                             f"max {self.max_tags})")


def profiles(graph: str, config: ModelConfig, limits: BatchLimits) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes of every input of `graph`."""
    size, dim, ctx = config.image_size, config.embed_dim, config.context_length
    h, w = config.grid_size
    b = (1, limits.opt_batch, limits.max_batch)
    k = (1, min(limits.opt_tags, limits.max_tags), limits.max_tags)
    negatives = len(config.negative_prompts)
    n = (1, max(1, negatives), max(16, negatives))  # room for calibration to choose other negative prompts
    shapes = {
        "image_encoder": [tuple((n, 3, size, size) for n in b)],
        # tag prompts arrive in large batches: allow 8x the image batch
        "text_encoder": [tuple((n, ctx) for n in (1, limits.opt_batch * 8, limits.max_batch * 8))],
        # views: 1, or 2 under flip TTA; the tag inputs' first axis: the batch, or 1 for a shared vocabulary
        "tag_head": [tuple((rows, views, dim, h, w) for rows, views in zip(b, (1, 1, 2))),
                     tuple((rows, t, dim) for rows, t in zip(b, k)), tuple((rows, t) for rows, t in zip(b, k)),
                     tuple((rows, m, dim) for rows, m in zip(b, n)), tuple((rows, 1) for rows in b)],
    }
    if graph not in shapes:
        raise InputError(f"unknown graph {graph!r}")
    return dict(zip(GRAPHS[graph].inputs, shapes[graph]))


def profile_record(config: ModelConfig, limits: BatchLimits) -> dict[str, dict[str, dict[str, list[int]]]]:
    """The manifest's record of every engine's profile: graph -> input -> {min, opt, max}."""
    return {graph: {name: dict(zip(("min", "opt", "max"), map(list, shapes)))
                    for name, shapes in profiles(graph, config, limits).items()} for graph in GRAPH_NAMES}


def network_flags(trt) -> int:
    """Strongly typed on TensorRT 10 (a creation flag there); TensorRT 11 networks always are, and
    its flag is deprecated and ignored."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def default_timing_cache(trt_version: str, compute_capability: tuple[int, int]) -> Path:
    """One timing cache per TensorRT version and GPU, in the user's cache folder."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ttd" / "tensorrt"
    return root / engine_name("timing", trt_version, compute_capability, "cache").removesuffix(".plan")


def _write_atomically(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(memoryview(data))
    os.replace(f.name, path)


def build_engine(onnx_path: Path, out_dir: Path, graph: str, config: ModelConfig, precision: str,
                 limits: BatchLimits, timing_cache: Path, compute_capability: tuple[int, int],
                 workspace_gib: float = 4.0) -> Path:
    """Build and write one engine; returns its path."""
    check_precision(precision)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # from the file, not its bytes: a graph over 2 GB keeps its weights in a file beside it
    # (external data), which the parser finds only relative to the model's own path
    if not parser.parse_from_file(str(Path(onnx_path).resolve())):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeProblem(f"TensorRT could not parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles(graph, config, limits).items():
        profile.set_shape(name, low, opt, high)
    if builder_config.add_optimization_profile(profile) < 0:
        raise RuntimeProblem(f"TensorRT rejected the optimisation profile of {graph}: {profiles(graph, config, limits)}")
    cache = builder_config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeProblem(f"TensorRT refused the timing cache {timing_cache} (made by another TensorRT version "
                           "or GPU?); delete it and build again")
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeProblem(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    _write_atomically(timing_cache, builder_config.get_timing_cache().serialize())
    path = out_dir / engine_name(graph, trt.__version__, compute_capability, precision)
    path.write_bytes(memoryview(serialized))
    return path


def build_engines(export_dir: Path, config: ModelConfig, precision: str, limits: BatchLimits,
                  timing_cache: Path | None = None) -> dict[str, Path]:
    """Engines for the three graphs of an export directory, beside them. Writes nothing else
    there: the timing cache lives outside (default_timing_cache)."""
    trt_version, capability = preflight(precision)
    cache = timing_cache or default_timing_cache(trt_version, capability)
    return {g: build_engine(export_dir / f"{g}.onnx", export_dir, g, config, precision, limits, cache, capability)
            for g in GRAPH_NAMES}


def engines_manifest(engines: dict[str, Path], config: ModelConfig, limits: BatchLimits) -> dict:
    """The manifest's `tensorrt` section: engine file names and the profile each accepts."""
    return {"engines": {g: p.name for g, p in engines.items()}, "profiles": profile_record(config, limits)}
