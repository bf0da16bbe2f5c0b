"""Generating and validating Triton model repositories (`ttd triton build`, `ttd triton validate`).

Two flavours of the three graph models: `native` (platform onnxruntime_onnx or tensorrt_plan, for
NVIDIA's server container) and `python` (Python-backend models that run the same ONNX graphs
with onnxruntime, for servers with the Python backend only). Both get the BLS `ttd_tagger`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

import onnx

import triton_repo
from ttd.runtime.export_dir import CONFIG, MANIFEST, read_export

TEMPLATES = Path(triton_repo.__file__).parent
GRAPH_MODELS = {"ttd_image_encoder": "image_encoder", "ttd_text_encoder": "text_encoder", "ttd_tag_head": "tag_head"}
TAGGER = "ttd_tagger"
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
                  onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT32: "TYPE_INT32",
                  onnx.TensorProto.BOOL: "TYPE_BOOL"}


class RepositoryError(ValueError):
    """A model repository is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16)
    queue_delay_us: int = 2000
    instances: int = 1
    kind: str = "KIND_CPU"

    def check(self) -> None:
        if any(p > self.max_batch_size or p < 1 for p in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes {self.preferred_batch_sizes} must lie in 1..{self.max_batch_size}")
        if self.kind not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO"):
            raise ValueError(f"instance kind {self.kind!r} must be KIND_CPU, KIND_GPU or KIND_AUTO")


def graph_io(graph_path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) of an ONNX graph as (name, Triton type, dims without the batch axis)."""
    graph = onnx.load(str(graph_path), load_external_data=False).graph

    def describe(values):
        out = []
        for v in values:
            tensor = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]
            out.append((v.name, ONNX_TO_TRITON.get(tensor.elem_type, f"UNSUPPORTED({tensor.elem_type})"), dims))
        return out

    initializers = {i.name for i in graph.initializer}
    return describe([i for i in graph.input if i.name not in initializers]), describe(graph.output)


def _tensor_block(entries, optional: set[str] = frozenset()) -> str:
    lines = []
    for name, dtype, dims in entries:
        extra = " optional: true" if name in optional else ""
        lines.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{extra} }}')
    return ",\n".join(lines)


def _warmup(inputs) -> str:
    entries = []
    for name, dtype, dims in inputs:
        concrete = ", ".join(str(d if d > 0 else 1) for d in dims)
        entries.append(f'    inputs {{ key: "{name}" value: {{ data_type: {dtype} dims: [ {concrete} ] zero_data: true }} }}')
    return "model_warmup [ {\n    name: \"zeros\"\n    batch_size: 1\n" + "\n".join(entries) + "\n} ]"


def _parameters(values: dict[str, str]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def build_repository(export_dir: Path, repo: Path, flavour: str = "python", engine: str = "onnx",
                     batching: BatchingOptions = BatchingOptions(), threshold: float = 0.5,
                     max_tags: int = 1024) -> Path:
    """Write a model repository for `export_dir` into `repo` (which must not exist or be empty)."""
    if flavour not in ("python", "native"):
        raise ValueError(f"unknown flavour {flavour!r}; choose python or native")
    if engine not in ("onnx", "tensorrt") or (engine == "tensorrt" and flavour != "native"):
        raise ValueError("engine must be onnx, or tensorrt with the native flavour")
    batching.check()
    export = read_export(export_dir)
    if repo.exists() and any(repo.iterdir()):
        raise ValueError(f"{repo} exists and is not empty; choose a new folder")
    template = Template((TEMPLATES / "model.pbtxt.in").read_text())
    common = {"source": str(export_dir), "max_batch_size": batching.max_batch_size,
              "preferred_batch_sizes": ", ".join(map(str, batching.preferred_batch_sizes)),
              "queue_delay_us": batching.queue_delay_us, "instances": batching.instances, "kind": batching.kind}
    for model, graph in GRAPH_MODELS.items():
        version = repo / model / "1"
        version.mkdir(parents=True)
        inputs, outputs = graph_io(export.graph(graph))
        if flavour == "python":
            engine_line = 'backend: "python"'
            shutil.copy(export.graph(graph), version / "model.onnx")
            shutil.copy(TEMPLATES / "onnx_model.py", version / "model.py")
            extra = _parameters({"intra_op_threads": "1", "max_variable_dim": str(max_tags)})
        elif engine == "onnx":
            engine_line = 'platform: "onnxruntime_onnx"'
            shutil.copy(export.graph(graph), version / "model.onnx")
            extra = ""
        else:
            engine_line = 'platform: "tensorrt_plan"'
            plans = export.manifest.get("tensorrt", {}).get("engines", {})
            if graph not in plans:
                raise ValueError(f"{export_dir} has no TensorRT engine for {graph}; run `ttd export --tensorrt` on a GPU")
            shutil.copy(export.file(plans[graph]), version / "model.plan")
            extra = ""
        extra = "\n".join(x for x in (extra, _warmup(inputs)) if x)
        (repo / model / "config.pbtxt").write_text(template.substitute(
            common, name=model, engine=engine_line, inputs=_tensor_block(inputs), outputs=_tensor_block(outputs),
            extra=extra))
    version = repo / TAGGER / "1"
    version.mkdir(parents=True)
    shutil.copy(TEMPLATES / "tagger_model.py", version / "model.py")
    for name in (CONFIG, MANIFEST):
        shutil.copy(export.root / name, version / name)
    h, w = export.config.grid_size
    tagger_inputs = [("image", "TYPE_STRING", [1]), ("caption", "TYPE_STRING", [1]), ("tags", "TYPE_STRING", [-1]),
                     ("return_masks", "TYPE_BOOL", [1])]
    tagger_outputs = [("tags", "TYPE_STRING", [-1]), ("scores", "TYPE_FP32", [-1]), ("selected", "TYPE_BOOL", [-1]),
                      ("masks", "TYPE_FP32", [-1, h, w])]
    parameters = {"threshold": str(threshold), "max_tags": str(max_tags),
                  "encoder_max_batch_size": str(batching.max_batch_size)}
    (repo / TAGGER / "config.pbtxt").write_text(template.substitute(
        common, name=TAGGER, engine='backend: "python"', inputs=_tensor_block(tagger_inputs, {"caption", "tags", "return_masks"}),
        outputs=_tensor_block(tagger_outputs), extra=_parameters(parameters)))
    (repo / "ttd_repository.json").write_text(json.dumps({"flavour": flavour, "engine": engine, "export": str(export_dir)}))
    return repo


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def validate_repository(repo: Path) -> list[str]:
    """Every config parsed with tritonclient's model_config_pb2 and checked against its files and
    graphs; returns a summary line per model, raises RepositoryError listing all problems."""
    from tritonclient.grpc import model_config_pb2

    problems, summary = [], []
    if not repo.is_dir():
        raise RepositoryError(f"{repo} is not a folder")
    models = sorted(p for p in repo.iterdir() if p.is_dir())
    names = {p.name for p in models}
    for expected in [*GRAPH_MODELS, TAGGER]:
        if expected not in names:
            problems.append(f"model {expected} is missing")
    batch_sizes = {}
    for folder in models:
        config_path = folder / "config.pbtxt"
        if not config_path.is_file():
            problems.append(f"{folder.name}: no config.pbtxt")
            continue
        try:
            config = _parse(config_path)
        except Exception as error:
            problems.append(f"{folder.name}/config.pbtxt does not parse: {error}")
            continue
        if config.name != folder.name:
            problems.append(f"{folder.name}: config name {config.name!r} differs from its folder")
        versions = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            problems.append(f"{folder.name}: no numeric version folder (e.g. 1/)")
            continue
        version = max(versions, key=lambda p: int(p.name))
        expected_file = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}.get(config.platform, "model.py")
        if config.backend and config.backend != "python":
            problems.append(f"{folder.name}: unsupported backend {config.backend!r}")
        if not (version / expected_file).is_file():
            problems.append(f"{folder.name}/{version.name}: {expected_file} is missing")
        batch_sizes[folder.name] = config.max_batch_size
        if config.max_batch_size < 1:
            problems.append(f"{folder.name}: max_batch_size must be ≥ 1 for dynamic batching")
        if config.HasField("dynamic_batching"):
            for size in config.dynamic_batching.preferred_batch_size:
                if size > config.max_batch_size:
                    problems.append(f"{folder.name}: preferred batch size {size} > max_batch_size {config.max_batch_size}")
        elif folder.name in GRAPH_MODELS:
            problems.append(f"{folder.name}: no dynamic_batching")
        graph = version / "model.onnx"
        if folder.name in GRAPH_MODELS and graph.is_file():
            inputs, outputs = graph_io(graph)
            for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
                declared_io = [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in declared]
                if sorted(declared_io) != sorted(actual):
                    problems.append(f"{folder.name}: {kind}s {declared_io} do not match the ONNX graph's {actual}")
        summary.append(f"{folder.name}: {config.platform or config.backend}, max_batch_size {config.max_batch_size}, "
                       f"version {version.name}")
    if len(set(batch_sizes.values())) > 1:
        problems.append(f"inconsistent max_batch_size across models: {batch_sizes}")
    if problems:
        raise RepositoryError(f"{repo}: " + "; ".join(problems))
    return summary
