"""Generating and validating Triton model repositories (`ttd triton build`, `ttd triton validate`).

Two flavours of the three graph models: `native` (platform onnxruntime_onnx or tensorrt_plan, for
NVIDIA's server container) and `python` (Python-backend models for servers with the Python
backend only, running the ONNX graphs with onnxruntime on the CPU, or the export's weights with
torch — on the GPU with `--kind KIND_GPU`). Both get the BLS `ttd_tagger`, which always runs on
the CPU (it decodes images and calls the graph models).

The third flavour, `fused`, is `ttd_tagger` alone: one Python-backend model that holds the
runtime backend (onnxruntime, torch or TensorRT) and the Tagger, with the export copied beside it
(docs/serving.md, "The fused flavour").
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

import onnx

import triton_repo
from ttd.errors import InputError, TTDError
from ttd.model.config import DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD, SCORE_METHODS, canonical_precision
from ttd.model.contract import (
    FUSED_IMAGE_INPUT,
    INSTANCE_KINDS,
    SERVED_GRAPHS,
    TAG_HEAD,
    TAGGER_INPUTS,
    TAGGER_MODEL,
    TAGGER_OUTPUTS,
    TRITON_ENGINES,
)
from ttd.runtime.export_dir import CONFIG, MANIFEST, TOKENIZER, TORCH_WEIGHTS, read_export, sha256
from ttd.serve.repository import record_problems, recorded_flavour, write_record

TEMPLATES = Path(triton_repo.__file__).parent
ENGINES = TRITON_ENGINES
TORCH_DTYPES = ("fp32", "bf16", "fp16")  # the torch engine's weight precisions (ttd.model.config names)
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
                  onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT32: "TYPE_INT32",
                  onnx.TensorProto.BOOL: "TYPE_BOOL"}


class RepositoryError(TTDError, ValueError):
    """A model repository is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16)
    queue_delay_us: int = 2000
    instances: int = 1
    kind: str | None = None  # None: KIND_GPU for TensorRT engines (see instance_kind), else KIND_CPU

    def check(self) -> None:
        if any(p > self.max_batch_size or p < 1 for p in self.preferred_batch_sizes):
            raise InputError(f"preferred batch sizes {self.preferred_batch_sizes} must lie in 1..{self.max_batch_size}")
        if self.kind is not None and self.kind not in INSTANCE_KINDS:
            raise InputError(f"instance kind {self.kind!r} must be KIND_CPU, KIND_GPU or KIND_AUTO")


def instance_kind(engine: str, kind: str | None) -> str:
    """The instance_group kind of the graph models. Triton's tensorrt backend refuses any
    instance that is not on a GPU ("supports only GPU device"), so TensorRT engines get KIND_GPU
    and an explicit KIND_CPU for them is an error, not a server that fails to load."""
    if engine != "tensorrt":
        return kind or "KIND_CPU"
    if kind == "KIND_CPU":
        raise InputError("TensorRT engines run only on GPU instances (Triton's tensorrt backend refuses KIND_CPU): "
                         "leave --kind out or pass --kind KIND_GPU")
    return kind or "KIND_GPU"


def _profile_max(profiles: dict, graph: str, name: str, axis: int) -> int:
    return int(profiles[graph][name]["max"][axis])


def tensorrt_limit_problems(manifest: dict, batch_sizes: dict[str, int], max_tags: int | None) -> list[str]:
    """Where a repository's limits exceed the engines' optimisation profiles (recorded in the
    export manifest): Triton refuses to load a tensorrt_plan model whose max_batch_size exceeds its
    engine's, and a tag head call with more tags than its profile fails at run time.
    `batch_sizes` maps model name -> max_batch_size."""
    profiles = manifest.get("tensorrt", {}).get("profiles")
    if not profiles:
        return ["the export manifest records no TensorRT profile limits (an export made before they were "
                "recorded): rebuild it with `ttd export --tensorrt`"]
    problems = []
    for model, size in batch_sizes.items():
        graph = SERVED_GRAPHS[model]
        limit = min(_profile_max(profiles, graph, name, 0) for name in profiles[graph])
        if size > limit:
            problems.append(f"{model}: max_batch_size {size} exceeds its TensorRT engine's profile maximum {limit} "
                            "(lower --max-batch-size, or re-export with a larger --max-batch)")
    profile_tags = _profile_max(profiles, TAG_HEAD.name, TAG_HEAD.inputs[1], 1)
    if max_tags is not None and max_tags > profile_tags:
        problems.append(f"{TAGGER_MODEL}: max_tags {max_tags} exceeds the tag head engine's profile maximum {profile_tags} "
                        f"(pass --max-tags {profile_tags} or less)")
    return problems


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


def _engine_files(export, export_dir: Path) -> dict[str, Path]:
    """The export's TensorRT engine files by graph: named in the manifest, hashed, inside the export."""
    plans = export.manifest.get("tensorrt", {}).get("engines", {})
    missing = [g for g in SERVED_GRAPHS.values() if g not in plans]
    if missing:
        raise InputError(f"{export_dir} has no TensorRT engine for {', '.join(missing)}; run `ttd export --tensorrt` on a GPU")
    return {graph: export.file(plans[graph]) for graph in SERVED_GRAPHS.values()}


def build_repository(export_dir: Path, repo: Path, flavour: str = "python", engine: str = "onnx",
                     batching: BatchingOptions = BatchingOptions(), threshold: float = DEFAULT_THRESHOLD,
                     max_tags: int = 1024, torch_dtype: str = "fp32",
                     score_method: str = DEFAULT_SCORE_METHOD) -> Path:
    """Write a model repository for `export_dir` into `repo` (which must not exist or be empty)."""
    if score_method not in SCORE_METHODS:
        raise InputError(f"unknown score method {score_method!r}; choose one of {', '.join(SCORE_METHODS)}")
    if flavour not in ENGINES:
        raise InputError(f"unknown flavour {flavour!r}; choose {', '.join(ENGINES)}")
    if engine not in ENGINES[flavour]:
        raise InputError(f"the {flavour} flavour serves engines {' or '.join(ENGINES[flavour])}, not {engine!r}")
    torch_dtype = canonical_precision(torch_dtype, TORCH_DTYPES)
    batching.check()
    kind = instance_kind(engine, batching.kind)
    export = read_export(export_dir)
    head_tags = max(max_tags, len(export.config.negative_prompts))  # the largest variable dim a head call has
    weights = export.torch_weights() if engine == "torch" else None
    plans = _engine_files(export, export_dir) if engine == "tensorrt" else {}
    if engine == "tensorrt":
        problems = tensorrt_limit_problems(export.manifest, dict.fromkeys(SERVED_GRAPHS, batching.max_batch_size), max_tags)
        if problems:
            raise InputError(f"{export_dir}: " + "; ".join(problems))
    if repo.exists() and any(repo.iterdir()):
        raise InputError(f"{repo} exists and is not empty; choose a new folder")
    template = Template((TEMPLATES / "model.pbtxt.in").read_text())
    if flavour == "fused":
        return _build_fused(export, export_dir, repo, engine, batching, kind, template, threshold, max_tags,
                            torch_dtype, score_method)
    common = {"source": str(export_dir), "max_batch_size": batching.max_batch_size,
              "preferred_batch_sizes": ", ".join(map(str, batching.preferred_batch_sizes)),
              "queue_delay_us": batching.queue_delay_us, "instances": batching.instances, "kind": kind}
    for model, graph in SERVED_GRAPHS.items():
        version = repo / model / "1"
        version.mkdir(parents=True)
        inputs, outputs = graph_io(export.graph(graph))
        if flavour == "python" and engine == "torch":
            engine_line = 'backend: "python"'
            shutil.copy(weights, version / TORCH_WEIGHTS)
            shutil.copy(export.root / CONFIG, version / CONFIG)
            shutil.copy(TEMPLATES / "graph_model.py", version / "model.py")
            extra = _parameters({"engine": "torch", "graph": graph, "dtype": torch_dtype, "max_variable_dim": str(head_tags)})
        elif flavour == "python":
            engine_line = 'backend: "python"'
            shutil.copy(export.graph(graph), version / "model.onnx")
            shutil.copy(TEMPLATES / "graph_model.py", version / "model.py")
            extra = _parameters({"engine": "onnxruntime", "intra_op_threads": "1", "max_variable_dim": str(head_tags),
                                 "precision": export.precision})
        elif engine == "onnx":
            engine_line = 'platform: "onnxruntime_onnx"'
            shutil.copy(export.graph(graph), version / "model.onnx")
            extra = ""
        else:
            engine_line = 'platform: "tensorrt_plan"'
            shutil.copy(plans[graph], version / "model.plan")
            extra = ""
        extra = "\n".join(x for x in (extra, _warmup(inputs)) if x)
        (repo / model / "config.pbtxt").write_text(template.substitute(
            common, name=model, engine=engine_line, inputs=_tensor_block(inputs), outputs=_tensor_block(outputs),
            extra=extra))
    version = repo / TAGGER_MODEL / "1"
    version.mkdir(parents=True)
    shutil.copy(TEMPLATES / "tagger_model.py", version / "model.py")
    for name in (CONFIG, MANIFEST):
        shutil.copy(export.root / name, version / name)
    if export.config.tokenizer.get("kind") == "clip_bpe":  # the tagger tokenises without torch (docs/edge.md)
        for path in (export.root / TOKENIZER, Path(export.config.tokenizer["path"])):
            shutil.copy(path, version / path.name)
    tagger_inputs, tagger_outputs = _tagger_io(export.config, fused=False)
    parameters = {"threshold": str(threshold), "max_tags": str(max_tags), "score_method": score_method,
                  "encoder_max_batch_size": str(batching.max_batch_size)}
    (repo / TAGGER_MODEL / "config.pbtxt").write_text(template.substitute(
        common, name=TAGGER_MODEL, kind="KIND_CPU",  # decoding, tokenising and BLS calls: CPU work whatever the graphs run on
        engine='backend: "python"', inputs=_tensor_block(tagger_inputs, set(TAGGER_INPUTS[1:])),  # only the image is required
        outputs=_tensor_block(tagger_outputs), extra=_parameters(parameters)))
    write_record(repo, {"flavour": flavour, "engine": engine, "export": str(export_dir)})  # and every file's hash
    return repo


def _tagger_io(config, fused: bool) -> tuple[list, list]:
    """ttd_tagger's inputs and outputs as (name, Triton type, dims); the fused tagger also takes
    uint8 RGB at the model's size, and then neither image input is required on its own."""
    h, w = config.grid_size
    inputs = [(n, *t) for n, t in zip(TAGGER_INPUTS, [("TYPE_STRING", [1]), ("TYPE_STRING", [1]),
                                                        ("TYPE_STRING", [-1]), ("TYPE_BOOL", [1])], strict=True)]
    if fused:
        inputs.insert(1, (FUSED_IMAGE_INPUT, "TYPE_UINT8", [config.image_size, config.image_size, 3]))
    outputs = [(n, *t) for n, t in zip(TAGGER_OUTPUTS, [("TYPE_STRING", [-1]), ("TYPE_FP32", [-1]),
                                                         ("TYPE_BOOL", [-1]), ("TYPE_FP32", [-1, h, w])], strict=True)]
    return inputs, outputs


def _model_batch(kind: str, preferred: tuple[int, ...], max_batch_size: int) -> int:
    """Images per model call in the fused tagger: its decoding pool goes on decoding the rest of a
    batch while the model runs these. On a GPU, the smallest preferred batch (the device wants
    large calls); on a CPU half of it: a world image costs the same CPU time per image at batch 4
    as at 8, and the split lets decoding overlap the model (docs/serving.md, "The fused flavour")."""
    smallest = min(preferred, default=max_batch_size)
    return smallest if kind != "KIND_CPU" else max(1, smallest // 2)


def _build_fused(export, export_dir: Path, repo: Path, engine: str, batching: BatchingOptions, kind: str,
                 template: Template, threshold: float, max_tags: int, torch_dtype: str, score_method: str) -> Path:
    """`ttd_tagger` alone, holding the runtime: the export (every file its manifest lists, so the
    runtime re-checks their hashes when it loads them) goes into the version folder's `export/`."""
    if engine == "torch":
        export.torch_weights()  # refused now (no model.safetensors) rather than when the server loads it
    version = repo / TAGGER_MODEL / "1"
    target = version / "export"
    target.mkdir(parents=True)
    for name in [*export.manifest["files"], MANIFEST]:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(export.root / name, target / name)
    shutil.copy(TEMPLATES / "fused_model.py", version / "model.py")
    inputs, outputs = _tagger_io(export.config, fused=True)
    parameters = {"engine": engine, "threshold": str(threshold), "max_tags": str(max_tags), "score_method": score_method,
                  "intra_op_threads": "1", "dtype": torch_dtype, "decode_threads": "2",
                  "multi_image_requests": "true",  # the front may coalesce requests (docs/serving.md, "Coalescing")
                  "model_batch": str(_model_batch(kind, batching.preferred_batch_sizes, batching.max_batch_size))}
    common = {"source": str(export_dir), "max_batch_size": batching.max_batch_size,
              "preferred_batch_sizes": ", ".join(map(str, batching.preferred_batch_sizes)),
              "queue_delay_us": batching.queue_delay_us, "instances": batching.instances, "kind": kind}
    (repo / TAGGER_MODEL / "config.pbtxt").write_text(template.substitute(
        common, name=TAGGER_MODEL, engine='backend: "python"', inputs=_tensor_block(inputs, {n for n, *_ in inputs}),
        outputs=_tensor_block(outputs), extra=_parameters(parameters)))
    write_record(repo, {"flavour": "fused", "engine": engine, "export": str(export_dir)})
    return repo


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def validate_repository(repo: Path) -> list[str]:
    """Every config parsed with tritonclient's model_config_pb2 and checked against its files and
    graphs, and every file the build wrote checked against its recorded sha256; returns a summary line per model, raises RepositoryError listing all problems."""
    from tritonclient.grpc import model_config_pb2

    problems, summary = [], []
    if not repo.is_dir():
        raise RepositoryError(f"{repo} is not a folder")
    models = sorted(p for p in repo.iterdir() if p.is_dir())
    names = {p.name for p in models}
    for expected in [TAGGER_MODEL] if recorded_flavour(repo) == "fused" else [*SERVED_GRAPHS, TAGGER_MODEL]:
        if expected not in names:
            problems.append(f"model {expected} is missing")
    batch_sizes, engines, tagger = {}, {}, None
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
        if config.parameters.get("engine") is not None and config.parameters["engine"].string_value == "torch":
            held = "export/" if (version / "export").is_dir() else ""  # the fused tagger holds the whole export
            for needed in (TORCH_WEIGHTS, CONFIG):
                if not (version / held / needed).is_file():
                    problems.append(f"{folder.name}/{version.name}: {held}{needed} is missing (torch engine)")
        batch_sizes[folder.name] = config.max_batch_size
        if config.max_batch_size < 1:
            problems.append(f"{folder.name}: max_batch_size must be ≥ 1 for dynamic batching")
        if config.HasField("dynamic_batching"):
            for size in config.dynamic_batching.preferred_batch_size:
                if size > config.max_batch_size:
                    problems.append(f"{folder.name}: preferred batch size {size} > max_batch_size {config.max_batch_size}")
        elif folder.name in SERVED_GRAPHS:
            problems.append(f"{folder.name}: no dynamic_batching")
        graph = version / "model.onnx"
        if folder.name in SERVED_GRAPHS and graph.is_file():
            inputs, outputs = graph_io(graph)
            for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
                declared_io = [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in declared]
                if sorted(declared_io) != sorted(actual):
                    problems.append(f"{folder.name}: {kind}s {declared_io} do not match the ONNX graph's {actual}")
        if config.platform == "tensorrt_plan":
            engines[folder.name] = (config, version)
        if folder.name == TAGGER_MODEL:
            tagger = (config, version)
        summary.append(f"{folder.name}: {config.platform or config.backend}, max_batch_size {config.max_batch_size}, "
                       f"version {version.name}")
    if len(set(batch_sizes.values())) > 1:
        problems.append(f"inconsistent max_batch_size across models: {batch_sizes}")
    if engines:
        problems += _tensorrt_problems(engines, tagger)
    problems += record_problems(repo)
    if problems:
        raise RepositoryError(f"{repo}: " + "; ".join(problems))
    return summary


def _tensorrt_problems(engines: dict, tagger) -> list[str]:
    """tensorrt_plan models: GPU instances only, each plan the one the export manifest (copied
    beside the tagger) names, and batch and tag limits inside the engines' profiles."""
    from tritonclient.grpc import model_config_pb2

    problems = []
    for model, (config, _) in engines.items():
        for group in config.instance_group:
            kind = model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)
            if kind not in ("KIND_GPU", "KIND_AUTO"):
                problems.append(f"{model}: instance_group kind {kind}, but Triton's tensorrt backend runs only on "
                                "GPU instances (use KIND_GPU)")
    manifest_path = tagger[1] / MANIFEST if tagger else None
    if manifest_path is None or not manifest_path.is_file():
        return problems + [f"{TAGGER_MODEL}: no {MANIFEST} beside it, so the TensorRT engines' limits cannot be checked"]
    manifest = json.loads(manifest_path.read_text())
    names = manifest.get("tensorrt", {}).get("engines", {})
    for model, (_, version) in engines.items():
        name = names.get(SERVED_GRAPHS.get(model, ""))
        plan = version / "model.plan"
        if model not in SERVED_GRAPHS or name is None:
            problems.append(f"{model}: the export manifest names no TensorRT engine for it")
        elif plan.is_file() and sha256(plan) != manifest.get("files", {}).get(name):
            problems.append(f"{model}: {version.name}/model.plan is not {name} of the export (sha256 differs)")
    known = {m: config.max_batch_size for m, (config, _) in engines.items() if m in SERVED_GRAPHS}
    parameters = tagger[0].parameters
    max_tags = int(parameters["max_tags"].string_value) if "ttd_tag_head" in known and "max_tags" in parameters else None
    return problems + tensorrt_limit_problems(manifest, known, max_tags)
