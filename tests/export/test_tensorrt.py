"""TensorRT paths on the CPU. TensorRT cannot be installed here, so a stand-in takes the place of
the few tensorrt calls the code makes (builder, parser, profile, timing cache, engine, execution
context), written against the TensorRT 10/11 Python API; everything else is the real code. The
fake execution context behaves like TensorRT where it matters: it reads and writes the buffers
at the addresses it is given, in the types the engine declares, and it answers False, keeping
its previous shapes, to a shape outside the profile."""

import ctypes
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from export.pipeline import run_export
from export.tensorrt import BatchLimits, TensorRTUnsupported, default_timing_cache, network_flags, profiles
from export.triton import BatchingOptions, RepositoryError, build_repository, validate_repository
from ttd.model.contract import ImageEmbeddings, TagHeadOutputs
from ttd.model.scoring import tag_head as scoring_head
from ttd.runtime.backend import tag_images_on_host
from ttd.cli import main
from ttd.model.factory import create_model
from ttd.runtime.export_dir import ExportDir, read_export
from ttd.runtime.tagger import Tagger
from ttd.runtime.tensorrt_backend import TensorRTBackend, deserialisation_failure

# ---------------------------------------------------------------- a stand-in for `tensorrt` (build)


class _Cache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data


class _Profile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, low, opt, high):
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class _BuilderConfig:
    def __init__(self, trt) -> None:
        self.trt, self.profiles, self.cache = trt, [], None

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        self.trt.calls.append(("set_flag", flag))

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return _Cache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return self.trt.accept_timing_cache

    def get_timing_cache(self):
        # every build adds timings, so the cache file changes
        return _Cache(self.cache.data + b"timing;")


class _Network:
    def __init__(self, flags) -> None:
        self.flags, self.layers = flags, []


class _Parser:
    """Parses from a file, as TensorRT finds external weights only beside the model's own path
    (no `parse(bytes)` here: a graph parsed from its bytes loses them)."""

    def __init__(self, network, logger) -> None:
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        import onnx

        path = Path(path)
        assert path.is_absolute()
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:  # external data is named relative to the model's folder
            for entry in tensor.external_data:
                if entry.key == "location" and not (path.parent / entry.value).is_file():
                    return False
        return path.read_bytes()[:1] == b"\x08"  # an ONNX ModelProto starts with field 1 (ir_version)


class _Builder:
    def __init__(self, trt) -> None:
        self.trt = trt

    def create_network(self, flags=0):
        self.trt.calls.append(("create_network", flags))
        return _Network(flags)

    def create_builder_config(self):
        return _BuilderConfig(self.trt)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        (profile,) = config.profiles
        return json.dumps({"flags": network.flags, "profile": profile.shapes}).encode()


def fake_tensorrt(version: str = "10.13.3.9", accept_timing_cache: bool = True, engines=None):
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.calls, trt.accept_timing_cache = version, [], accept_timing_cache
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    strongly_typed = 1 if version.startswith("10.") else 0  # the enum's value in 10.x and in 11.x
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=strongly_typed)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.BuilderFlag = types.SimpleNamespace(FP16=0, BF16=1, INT8=2)
    trt.Builder = lambda logger: _Builder(trt)
    trt.OnnxParser = _Parser
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: (engines or {}).get(bytes(data)))
    return trt


@pytest.fixture()
def gpu_with(monkeypatch, tmp_path):
    """Installs a fake tensorrt module and a visible sm90 GPU; returns the installer."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def install(trt):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return install


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    """An export with (fake) engines: real ONNX graphs and manifest, dummy .plan files."""
    root = tmp_path_factory.mktemp("trt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        patch.setitem(sys.modules, "tensorrt", fake_tensorrt())
        model = create_model("world-tiny", seed=0)
        out = root / "export"
        limits = BatchLimits(opt_batch=4, max_batch=16, opt_tags=8, max_tags=64)
        manifest = run_export(model, out, check_count=8, tensorrt=True, tensorrt_limits=limits)
    return model, out, manifest


# ---------------------------------------------------------------- building engines


def test_int8_with_tensorrt_is_refused_before_any_work(tmp_path, tiny_model):
    out = tmp_path / "export"
    for mode in ("dynamic", "static"):
        with pytest.raises(TensorRTUnsupported, match="int8 cannot be built into TensorRT engines.*DynamicQuantizeLinear"
                                                      ".*--precision fp16 or bf16"):
            run_export(tiny_model, out, precision="int8", int8_mode=mode, tensorrt=True)
    assert not out.exists()  # nothing exported, nothing to clean up
    result = CliRunner().invoke(main, ["export", "--precision", "int8", "--tensorrt", str(out)])
    assert result.exit_code != 0 and "int8 cannot be built into TensorRT engines" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_engines_are_strongly_typed_with_no_precision_flag(trt_export, gpu_with, tmp_path):
    _, out, _ = trt_export
    for version, flags in (("10.13.3.9", 1 << 1), ("11.1.0", 0)):
        trt = gpu_with(fake_tensorrt(version))
        assert network_flags(trt) == flags
        from export.tensorrt import build_engines

        for precision in ("fp16", "bf16"):
            copy = tmp_path / f"{version}-{precision}"
            copy.mkdir()
            for name in ("image_encoder.onnx", "text_encoder.onnx", "tag_head.onnx"):
                (copy / name).write_bytes((out / name).read_bytes())
            config = create_model("world-tiny").config
            engines = build_engines(copy, config, precision, BatchLimits())
            assert engines["tag_head"].name == f"tag_head.trt{version[:version.index('.', 3)]}.sm90.{precision}.plan"
            built = json.loads(engines["image_encoder"].read_bytes())
            assert built["flags"] == flags
        assert [c for c in trt.calls if c[0] == "set_flag"] == []  # no FP16/BF16/INT8 flag on any graph


def test_timing_cache_stays_out_of_the_export_so_a_reexport_verifies(trt_export, gpu_with, tmp_path):
    model, out, manifest = trt_export
    gpu_with(fake_tensorrt())
    assert not [p.name for p in out.iterdir() if "timing" in p.name or "cache" in p.name]
    again = tmp_path / "again"  # a second export into the first one's folder, engines and all
    shutil.copytree(out, again)
    run_export(model, again, check_count=8, tensorrt=True,
               tensorrt_limits=BatchLimits(opt_batch=4, max_batch=16, opt_tags=8, max_tags=64))
    read_export(again)  # raises if a hashed file changed after the manifest was written
    cache = default_timing_cache("10.13.3.9", (9, 0))
    assert cache.parent == tmp_path / "cache" / "ttd" / "tensorrt" and cache.name == "timing.trt10.13.sm90.cache"
    assert cache.read_bytes().count(b"timing;") == 3  # grown by each build, and read back by the next


def test_a_graph_with_external_weights_is_parsed_from_its_own_folder(trt_export, gpu_with, tmp_path, monkeypatch):
    """Graphs over 2 GB (ViT-L and up) keep their weights in a file beside the .onnx; the parser
    must be given the model's path to find it, from whatever directory `ttd export` runs in."""
    import onnx

    _, out, _ = trt_export
    gpu_with(fake_tensorrt())
    from export.tensorrt import build_engine

    folder = tmp_path / "external"
    folder.mkdir()
    model = onnx.load(str(out / "image_encoder.onnx"))
    onnx.save_model(model, str(folder / "image_encoder.onnx"), save_as_external_data=True,
                    location="image_encoder.onnx.data", size_threshold=0)
    assert (folder / "image_encoder.onnx.data").is_file()
    monkeypatch.chdir(tmp_path)
    engine = build_engine(Path("external") / "image_encoder.onnx", folder, "image_encoder",
                          create_model("world-tiny").config, "fp32", BatchLimits(), tmp_path / "timing.cache", (9, 0))
    assert engine.is_file()
    (folder / "image_encoder.onnx.data").unlink()
    with pytest.raises(RuntimeError, match="TensorRT could not parse"):
        build_engine(folder / "image_encoder.onnx", folder, "image_encoder", create_model("world-tiny").config, "fp32",
                     BatchLimits(), tmp_path / "timing.cache", (9, 0))


def test_a_refused_timing_cache_is_an_error(trt_export, gpu_with, tmp_path):
    _, out, _ = trt_export
    gpu_with(fake_tensorrt(accept_timing_cache=False))
    from export.tensorrt import build_engine

    with pytest.raises(RuntimeError, match="TensorRT refused the timing cache .* delete it and build again"):
        build_engine(out / "tag_head.onnx", tmp_path, "tag_head", create_model("world-tiny").config, "fp32",
                     BatchLimits(), tmp_path / "timing.cache", (9, 0))


def test_manifest_records_each_engine_and_its_profile(trt_export):
    _, out, manifest = trt_export
    section = manifest["tensorrt"]
    assert section["engines"] == {g: f"{g}.trt10.13.sm90.fp32.plan" for g in ("image_encoder", "text_encoder", "tag_head")}
    # max_tags 64 plus the 5 negative prompts of the default score
    assert section["profiles"]["tag_head"]["tag_embeds"] == {"min": [1, 1, 128], "opt": [4, 8, 128], "max": [16, 64, 128]}
    assert section["profiles"]["tag_head"]["negative_embeds"] == {"min": [1, 1, 128], "opt": [4, 5, 128],
                                                                  "max": [16, 16, 128]}
    assert section["profiles"]["tag_head"]["patch_views"]["max"] == [16, 2, 128, 8, 8]  # two views: flip TTA
    assert section["profiles"]["text_encoder"]["input_ids"]["max"] == [128, 32]
    built = json.loads((out / section["engines"]["image_encoder"]).read_bytes())  # what the builder was given
    assert built["profile"]["pixel_values"] == [[1, 3, 64, 64], [4, 3, 64, 64], [16, 3, 64, 64]]
    assert set(section["engines"].values()) <= set(manifest["files"])


def test_profile_limits_are_checked_when_given():
    config = create_model("world-tiny").config
    # the default profile reaches the batch `ttd tag` runs on a data-centre GPU
    assert profiles("tag_head", config, BatchLimits(max_tags=4))["tag_embeds"] == ((1, 1, 128), (8, 4, 128), (256, 4, 128))
    assert profiles("image_encoder", config, BatchLimits())["pixel_values"][2] == (256, 3, 64, 64)
    with pytest.raises(ValueError, match="--opt-batch 64 must lie in 1..--max-batch 32"):
        BatchLimits(opt_batch=64, max_batch=32)
    result = CliRunner().invoke(main, ["export", "--opt-batch", "64", "--max-batch", "32", "--tensorrt", "unused"])
    assert result.exit_code != 0 and "--opt-batch 64 must lie in 1..--max-batch 32" in result.output


# ---------------------------------------------------------------- Triton over the engines


def test_native_repository_over_engines_is_gpu_and_inside_the_profiles(trt_export, tmp_path):
    _, out, _ = trt_export
    repo = build_repository(out, tmp_path / "repo", "native", "tensorrt",
                            BatchingOptions(max_batch_size=16, preferred_batch_sizes=(4, 8)), max_tags=64)
    summary = validate_repository(repo)
    assert "ttd_image_encoder: tensorrt_plan, max_batch_size 16, version 1" in summary
    for model in ("ttd_image_encoder", "ttd_text_encoder", "ttd_tag_head"):
        assert "kind: KIND_GPU" in (repo / model / "config.pbtxt").read_text()
    assert "kind: KIND_CPU" in (repo / "ttd_tagger" / "config.pbtxt").read_text()  # decoding and tokenising

    # a repository whose configs were edited afterwards is caught by the validator
    config = repo / "ttd_tag_head" / "config.pbtxt"
    config.write_text(config.read_text().replace("KIND_GPU", "KIND_CPU"))
    tagger = repo / "ttd_tagger" / "config.pbtxt"
    tagger.write_text(tagger.read_text().replace('key: "max_tags" value: { string_value: "64" }',
                                                 'key: "max_tags" value: { string_value: "65" }'))
    with pytest.raises(RepositoryError) as error:
        validate_repository(repo)
    message = str(error.value)
    assert "ttd_tag_head: instance_group kind KIND_CPU, but Triton's tensorrt backend runs only on GPU" in message
    assert "ttd_tagger: max_tags 65 exceeds the tag head engine's profile maximum 64" in message
    assert "ttd_image_encoder" not in message


def test_validator_catches_batch_over_the_profile_and_a_swapped_plan(trt_export, tmp_path):
    _, out, _ = trt_export
    repo = build_repository(out, tmp_path / "repo", "native", "tensorrt",
                            BatchingOptions(max_batch_size=16, preferred_batch_sizes=(8,)), max_tags=64)
    for model in ("ttd_image_encoder", "ttd_text_encoder", "ttd_tag_head", "ttd_tagger"):
        config = repo / model / "config.pbtxt"
        config.write_text(config.read_text().replace("max_batch_size: 16", "max_batch_size: 32"))
    (repo / "ttd_text_encoder" / "1" / "model.plan").write_bytes(b"another engine")
    with pytest.raises(RepositoryError) as error:
        validate_repository(repo)
    message = str(error.value)
    assert "ttd_image_encoder: max_batch_size 32 exceeds its TensorRT engine's profile maximum 16" in message
    assert "ttd_tag_head: max_batch_size 32 exceeds its TensorRT engine's profile maximum 16" in message
    assert "ttd_text_encoder: max_batch_size 32" not in message  # its profile allows 128
    assert "ttd_text_encoder: 1/model.plan is not text_encoder.trt10.13.sm90.fp32.plan of the export" in message


def test_build_refuses_cpu_instances_and_limits_over_the_profiles(trt_export, tmp_path):
    _, out, _ = trt_export
    cases = [(BatchingOptions(kind="KIND_CPU"), 64, "TensorRT engines run only on GPU instances"),
             (BatchingOptions(max_batch_size=32), 64, "ttd_image_encoder: max_batch_size 32 exceeds its TensorRT "
                                                      "engine's profile maximum 16"),
             (BatchingOptions(max_batch_size=16), 1024, "ttd_tagger: max_tags 1024 exceeds the tag head engine's "
                                                        "profile maximum 64 \\(pass --max-tags 64 or less\\)")]
    for i, (options, max_tags, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            build_repository(out, tmp_path / f"repo{i}", "native", "tensorrt", options, max_tags=max_tags)
        assert not (tmp_path / f"repo{i}").exists()
    result = CliRunner().invoke(main, ["triton", "build", str(out), str(tmp_path / "cli"), "--flavour", "native",
                                       "--graph-engine", "tensorrt", "--max-batch-size", "16", "--max-tags", "64"])
    assert result.exit_code == 0, result.output
    assert "kind: KIND_GPU" in (tmp_path / "cli" / "ttd_image_encoder" / "config.pbtxt").read_text()
    onnx_repo = build_repository(out, tmp_path / "onnx", "native", "onnx", BatchingOptions())
    assert "kind: KIND_CPU" in (onnx_repo / "ttd_image_encoder" / "config.pbtxt").read_text()


# ---------------------------------------------------------------- the runtime against fake engines

TAU, MASK_WEIGHT, MASK_BIAS = 100.0, 10.0, -2.5
DTYPE_NAMES = {np.dtype(np.float32): "FLOAT", np.dtype(np.float16): "HALF", np.dtype(np.int32): "INT32",
               np.dtype(np.int64): "INT64", np.dtype(np.bool_): "BOOL"}


def _unit(x, axis):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def reference_graphs(config):
    """The three graphs as numpy functions; every row of a batch depends only on that row."""
    rng = np.random.default_rng(0)
    project = rng.normal(size=(3, config.embed_dim)).astype(np.float32)
    vocab = rng.normal(size=(4096, config.embed_dim)).astype(np.float32)
    h, w = config.grid_size
    pool = config.image_size // h

    def image_encoder(pixel_values):
        n = len(pixel_values)
        pooled = pixel_values.reshape(n, 3, h, pool, w, pool).mean(axis=(3, 5))
        patches = _unit(np.einsum("nchw,cd->ndhw", pooled, project) + 0.1, 1)
        return _unit(patches.mean(axis=(2, 3)), 1), patches

    def text_encoder(input_ids):
        return (_unit(vocab[input_ids % len(vocab)].sum(axis=1), 1),)

    def tag_head(patch_views, tag_embeds, tag_valid, negative_embeds, negative_margin):
        inputs = [torch.from_numpy(np.ascontiguousarray(a)) for a in
                  (patch_views, tag_embeds, tag_valid, negative_embeds, negative_margin)]
        with torch.no_grad():
            return tuple(o.numpy() for o in scoring_head(*inputs, TAU, MASK_WEIGHT, MASK_BIAS))

    return {"image_encoder": image_encoder, "text_encoder": text_encoder, "tag_head": tag_head}


class NumpyBackend:
    """The unchunked reference the TensorRT backend must agree with."""

    name = "numpy"

    def __init__(self, graphs) -> None:
        self.graphs = graphs

    def encode_images(self, pixel_values):
        return ImageEmbeddings(*self.graphs["image_encoder"](pixel_values.astype(np.float32)))

    def encode_texts(self, input_ids):
        return self.graphs["text_encoder"](input_ids)[0]

    def score_tags(self, patch_views, request):
        scores, cosines = self.graphs["tag_head"](patch_views, *request.arrays())
        return TagHeadOutputs(scores, cosines if request.with_cosines else None)

    def tag_images(self, images, preprocessing, request):
        return tag_images_on_host(self, images, preprocessing, request)


def _array_at(address, shape, dtype):
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * size).from_address(address), dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine) -> None:
        self.engine, self.shapes, self.addresses, self.executed = engine, {}, {}, []

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profile[name]
        if len(shape) != len(high) or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            return False  # TensorRT keeps the previous shape
        if name in self.engine.refuse and tuple(shape) == self.engine.refuse[name]:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def _outputs(self):
        inputs = {n: np.zeros(self.shapes[n], self.engine.dtypes[n]) for n in self.engine.inputs}
        return dict(zip(self.engine.outputs, self.engine.function(**inputs)))

    def get_tensor_shape(self, name):
        return tuple(self._outputs()[name].shape)

    def execute_async_v3(self, stream_handle):
        inputs = {n: _array_at(self.addresses[n], self.shapes[n], self.engine.dtypes[n]).copy()
                  for n in self.engine.inputs}
        self.executed.append({n: a.shape for n, a in inputs.items()})
        results = self.engine.function(**{n: a.astype(np.float32 if a.dtype.kind == "f" else a.dtype)
                                          for n, a in inputs.items()})
        for name, value in zip(self.engine.outputs, results):
            target = _array_at(self.addresses[name], value.shape, self.engine.dtypes[name])
            target[...] = value.astype(self.engine.dtypes[name])
        return True


class FakeEngine:
    """The ICudaEngine calls the backend makes: I/O names, profile 0, tensor types, contexts."""

    def __init__(self, function, profile, outputs, dtypes, refuse=None) -> None:
        self.function, self.profile, self.outputs, self.refuse = function, profile, outputs, refuse or {}
        self.inputs = tuple(profile)
        contract = {"input_ids": np.int64, "tag_valid": np.bool_}  # every other tensor of the contract is float32
        self.dtypes = {n: np.dtype(dtypes.get(n, contract.get(n, np.float32))) for n in (*self.inputs, *outputs)}
        self.contexts = []

    @property
    def num_io_tensors(self):
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index):
        return (*self.inputs, *self.outputs)[index]

    def get_tensor_profile_shape(self, name, profile_index):
        assert profile_index == 0
        return [list(s) for s in self.profile[name]]

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=DTYPE_NAMES[self.dtypes[name]])

    def get_tensor_shape(self, name):
        """Shapes before any input shape is set: the batch axis is dynamic."""
        context = FakeContext(self)
        for input_name, (low, _, _) in self.profile.items():
            context.set_input_shape(input_name, low)
        return (-1, *context.get_tensor_shape(name)[1:])

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_engines(config, limits: BatchLimits, graphs, dtypes=None, refuse=None):
    dtypes = dtypes or {}
    outputs = {"image_encoder": ("image_embeds", "patch_embeds"), "text_encoder": ("text_embeds",),
               "tag_head": ("tag_scores", "tag_cosines")}
    return {graph: FakeEngine(graphs[graph], profiles(graph, config, limits), outputs[graph], dtypes.get(graph, {}),
                              (refuse or {}).get(graph))
            for graph in outputs}


def _backend(config, engines):
    export = ExportDir(Path("unused"), {"mask_weight": MASK_WEIGHT, "mask_bias": MASK_BIAS}, config)
    return TensorRTBackend(export, engines=engines, device="cpu")


def _world_images(config, count):
    return np.random.default_rng(1).integers(0, 256, size=(count, config.image_size, config.image_size, 3), dtype=np.uint8)


@pytest.mark.parametrize("score_method", ["softmax", "negatives"])
def test_calls_are_split_to_the_profile_and_agree_with_an_unchunked_reference(score_method):
    config = create_model("world-tiny").config
    graphs = reference_graphs(config)
    limits = BatchLimits(opt_batch=2, max_batch=4, opt_tags=4, max_tags=6)  # text: 32 prompts a call at most
    engines = fake_engines(config, limits, graphs)
    tags = [f"word{i}" for i in range(15)]  # 15 tags x 3 templates = 45 prompts > 32
    options = {"flip_tta": True, "mask_weight": MASK_WEIGHT, "mask_bias": MASK_BIAS, "score_method": score_method}
    reference = Tagger(NumpyBackend(graphs), config, **options)
    candidate = Tagger(_backend(config, engines), config, **options)
    images = _world_images(config, 3)  # flip TTA: 6 images for an engine that takes 4
    # lists padded to 6 run in one engine call (3 images, 2 views); 15 tags > the profile's 6 run in torch
    for tag_lists, head_calls in (([tags[:3], tags[:6], tags[5:11]], [((3, 2), 6)]), ([tags[:3], tags, tags[5:11]], [])):
        before = len(engines["tag_head"].contexts[0].executed)
        expected = reference.tag(images, tag_lists, with_masks=True)
        got = candidate.tag(images, tag_lists, with_masks=True)
        for a, b in zip(expected, got):
            np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b.masks, a.masks, rtol=1e-5, atol=1e-6)
            assert b.selected == a.selected
        assert [len(a.tags) for a in got] == [len(t) for t in tag_lists]
        executed = engines["tag_head"].contexts[0].executed[before:]
        assert [(c["patch_views"][:2], c["tag_embeds"][1]) for c in executed] == head_calls
    image_calls = [c["pixel_values"][0] for c in engines["image_encoder"].contexts[0].executed]
    assert image_calls == [4, 2, 4, 2]
    text_calls = [c["input_ids"][0] for c in engines["text_encoder"].contexts[0].executed]
    # always TEXT_ROWS (8) prompts a call, each tag encoded once, a batch's novel tags together:
    # 11 tags x 3 templates (5 calls), the 5 negative prompts x 3 (2 calls), then 4 tags x 3 (2 calls)
    assert text_calls == [8] * 9

    # the batch axis of every graph, directly against the reference
    backend = _backend(config, engines)
    pixels = np.random.default_rng(2).normal(size=(9, 3, 64, 64)).astype(np.float32)
    for got_part, want in zip(backend.encode_images(pixels), graphs["image_encoder"](pixels)):
        np.testing.assert_allclose(got_part, want, rtol=1e-5, atol=1e-6)
    views = graphs["image_encoder"](pixels)[1][:, None]
    request = reference.request([[f"word{i}" for i in range(5)]] * 9, with_cosines=True)
    for got_part, want in zip(backend.score_tags(views, request), graphs["tag_head"](views, *request.arrays())):
        np.testing.assert_allclose(got_part, want, rtol=1e-5, atol=1e-6)
    assert [c["patch_views"][0] for c in engines["tag_head"].contexts[-1].executed] == [4, 4, 1]


def _world_tags(config, batch, count):
    return _unit(np.random.default_rng(3).normal(size=(batch, count, config.embed_dim)).astype(np.float32), 2)


def test_buffer_types_come_from_the_engine():
    config = create_model("world-tiny").config
    graphs = reference_graphs(config)
    dtypes = {"image_encoder": {"image_embeds": np.float16, "patch_embeds": np.float16},
              "text_encoder": {"input_ids": np.int32}}
    backend = _backend(config, fake_engines(config, BatchLimits(), graphs, dtypes))
    pixels = np.random.default_rng(2).normal(size=(3, 3, 64, 64)).astype(np.float32)
    global_embeds, patch_embeds = backend.encode_images(pixels)
    assert global_embeds.dtype == np.float32  # the contract's type, whatever the engine computes in
    np.testing.assert_allclose(patch_embeds, graphs["image_encoder"](pixels)[1], atol=2e-3)
    ids = np.random.default_rng(4).integers(0, 60, size=(5, config.context_length))
    np.testing.assert_allclose(backend.encode_texts(ids), graphs["text_encoder"](ids)[0], rtol=1e-5, atol=1e-6)


def test_a_refused_shape_is_an_error_not_a_stale_run():
    config = create_model("world-tiny").config
    graphs = reference_graphs(config)
    engines = fake_engines(config, BatchLimits(), graphs, refuse={"text_encoder": {"input_ids": (3, 32)}})
    backend = _backend(config, engines)
    ids = np.random.default_rng(4).integers(0, 60, size=(2, config.context_length))
    backend.encode_texts(ids)
    with pytest.raises(RuntimeError, match=r"TensorRT refused shape \(3, 32\) for text_encoder input input_ids"):
        backend.encode_texts(np.concatenate([ids, ids[:1]]))
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 40\); the engine's profile accepts 32..32 on axis 1"):
        backend.encode_texts(np.zeros((2, 40), np.int64))


def test_an_engine_that_does_not_load_says_why(trt_export, gpu_with, monkeypatch):
    _, out, _ = trt_export
    gpu_with(fake_tensorrt("11.1.0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    with pytest.raises(RuntimeError) as error:
        TensorRTBackend(read_export(out))
    assert str(error.value) == (
        "TensorRT could not load image_encoder.trt10.13.sm90.fp32.plan: it was built with TensorRT 10.13, this is "
        "TensorRT 11.1.0; it was built for GPU compute capability sm90, this GPU is sm100. To fix it, rebuild the "
        "engines with `ttd export --tensorrt` on this machine")
    assert "its name matches this machine (TensorRT 10.13, sm90), so the file comes from an incompatible" in deserialisation_failure(
        "tag_head.trt10.13.sm90.bf16.plan", "10.13.3.9", (9, 0))


def test_device_cuda_n_loads_the_engines_on_that_gpu(trt_export, gpu_with, monkeypatch):
    """`ttd tag --backend tensorrt --device cuda:1`: the engines are deserialised with GPU 1 current
    (TensorRT makes them on the current device) and checked against GPU 1's compute capability."""
    import contextlib

    from ttd.runtime import load_tagger

    _, out, _ = trt_export
    gpu_with(fake_tensorrt())
    current, asked = [], []

    @contextlib.contextmanager
    def device(chosen):
        current.append(str(chosen))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (9, 0))
    with pytest.raises(RuntimeError, match="TensorRT could not load image_encoder"):  # the stand-in loads nothing
        load_tagger("tensorrt", export_dir=str(out), device="cuda:1")
    assert current == ["cuda:1"] and asked[-1] == "cuda:1"
