import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from export.checks import FP32_GATE, GateError, check_pairs, compare, enforce
from export.pipeline import run_export
from export.tensorrt import BatchLimits, engine_name, profiles
from ttd.cli import main
from ttd.model.factory import create_model
from ttd.runtime.images import Preprocess
from ttd.runtime import load_tagger
from ttd.runtime.export_dir import ExportError, read_export
from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend, choose_providers
from ttd.runtime.tagger import Tagger


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    model = create_model("world-tiny", seed=0)
    out = tmp_path_factory.mktemp("export")
    manifest = run_export(model, out, check_count=16)
    return model, out, manifest


def test_fp32_export_passes_parity_at_batch_sizes_1_3_7(tiny_export):
    model, out, manifest = tiny_export
    # the score's margin and how it was fitted travel with the export (world-tiny: never fitted)
    assert manifest["negative_margin"] == model.config.negative_margin and manifest["margin_fit"] is None
    parity = manifest["parity"]
    assert parity["batch_sizes"] == [1, 3, 7]
    for name in ("image_embeds", "patch_embeds", "text_embeds"):
        assert parity["max_abs"][name] < 1e-4, name
        assert parity["min_cosine"][name] > 0.99999, name
    assert parity["tag_agreement"] == 1.0
    for name in ("image_encoder", "text_encoder", "tag_head"):
        graph = onnx.load(str(out / f"{name}.onnx"))
        onnx.checker.check_model(graph)
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in onnx.load(str(out / "image_encoder.onnx")).graph.output] == ["image_embeds", "patch_embeds"]


def test_manifest_hashes_verify_and_detect_tampering(tiny_export, tmp_path):
    _, out, manifest = tiny_export
    export = read_export(out)
    assert export.config.name == "world-tiny" and export.config.grid_size == (8, 8) and export.config.tau == 100.0
    assert set(manifest["files"]) >= {"image_encoder.onnx", "text_encoder.onnx", "tag_head.onnx", "model.json",
                                      "stopwords.txt"}
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    with (copy / "tag_head.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match="tag_head.onnx does not match its sha256"):
        read_export(copy)


def test_gate_fails_on_a_corrupted_graph(tiny_export, tmp_path):
    model, out, _ = tiny_export
    graph = onnx.load(str(out / "image_encoder.onnx"))
    weight = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(weight).copy()
    values *= -1.0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in out.iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    onnx.save(graph, str(bad / "image_encoder.onnx"))
    reference = load_tagger("torch", model="world-tiny")
    candidate = Tagger(OnnxRuntimeBackend(read_export(bad, verify=False), "cpu"), model.config)
    figures = compare(reference, candidate, *check_pairs(Preprocess(64), 16))
    with pytest.raises(GateError, match=r"image_embeds max abs error .* > 1e-03"):
        enforce(figures, FP32_GATE, "corrupted export")


@pytest.mark.parametrize("precision, mode", [("int8", "dynamic"), ("int8", "static"), ("fp16", "dynamic")])
def test_precision_variants_pass_their_quality_gate(tmp_path, precision, mode):
    manifest = run_export(create_model("world-tiny", seed=0), tmp_path, precision, mode, check_count=32)
    quality = manifest["quality"]
    assert manifest["precision"] == precision
    assert min(quality["min_cosine"][k] for k in ("image_embeds", "patch_embeds", "text_embeds")) >= 0.99
    assert quality["tag_agreement"] >= 0.95
    assert read_export(tmp_path).precision == precision
    # the graphs really are of the new precision (a step that returned the fp32 graph fails here) ...
    for name in ("image_encoder", "text_encoder"):
        graph = onnx.load(str(tmp_path / f"{name}.onnx"))
        ops = {node.op_type for node in graph.graph.node}
        weight_bytes = {}
        for tensor in graph.graph.initializer:
            weight_bytes[tensor.data_type] = weight_bytes.get(tensor.data_type, 0) + len(tensor.raw_data)
        if precision == "fp16":
            assert weight_bytes.get(onnx.TensorProto.FLOAT16, 0) > 4 * weight_bytes.get(onnx.TensorProto.FLOAT, 0), name
        else:
            expected_ops = {"MatMulInteger", "DynamicQuantizeLinear"} if mode == "dynamic" else {"QuantizeLinear", "DequantizeLinear"}
            assert expected_ops <= ops, (name, sorted(ops))
            # dynamic: int8 weights; static: uint8 weights (the u8u8 kernels cannot saturate on any x86-64)
            quantised = weight_bytes.get(onnx.TensorProto.INT8, 0) + weight_bytes.get(onnx.TensorProto.UINT8, 0)
            assert quantised > weight_bytes.get(onnx.TensorProto.FLOAT, 0), name
    # ... and their quality, recomputed here with a plain onnxruntime session against the torch model on
    # world pairs the exporter never saw, passes the same bar
    import onnxruntime as ort

    from ttd.data.world import make_sample
    from ttd.runtime.images import normalize

    model = create_model("world-tiny", seed=0)
    samples = [make_sample(11, i) for i in range(12)]
    pixels = normalize(np.stack([s.image for s in samples]), model.config.mean, model.config.std)
    tokens = model.tokenizer([s.caption for s in samples])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # ALL segfaults on fp16 (docs/architecture.md §5)
    image = ort.InferenceSession(str(tmp_path / "image_encoder.onnx"), options, providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(tmp_path / "text_encoder.onnx"), options, providers=["CPUExecutionProvider"])
    got_image, got_patch = image.run(None, {"pixel_values": pixels})
    (got_text,) = text.run(None, {"input_ids": tokens.astype(np.int64)})
    import torch

    with torch.no_grad():
        want_image, want_patch = (t.numpy() for t in model.encode_image(torch.from_numpy(pixels)))
        want_text = model.encode_texts([s.caption for s in samples]).numpy()
    cosines = {"image": (got_image * want_image).sum(-1), "patch": (got_patch * want_patch).sum(1),
               "text": (got_text * want_text).sum(-1)}
    for key, values in cosines.items():
        assert values.min() >= 0.99, (key, values.min())
    assert max(np.abs(got_image - want_image).max(), np.abs(got_text - want_text).max()) > 1e-5  # not the fp32 graph


def _onnxruntime_runs_bf16_matmul() -> bool:
    """Whether this onnxruntime build's CPU provider has a bf16 MatMul kernel (most have none)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "probe",
                              [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2, 2]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def test_bf16_export_is_gated_or_refused_by_what_onnxruntime_can_run(tmp_path):
    """Whatever the onnxruntime build: a bf16 export either passes its gate or is refused with
    the reason and leaves no graphs (never a graph that cannot run here)."""
    result = CliRunner().invoke(main, ["export", str(tmp_path / "x"), "--model", "world-tiny", "--precision", "bf16"])
    if _onnxruntime_runs_bf16_matmul():
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "x" / "manifest.json").read_text())["precision"] == "bf16"
    else:
        assert result.exit_code == 2
        assert "bf16 export refused: onnxruntime cannot run it here" in result.output
        assert not (tmp_path / "x" / "image_encoder.onnx").exists()


@pytest.mark.parametrize("dense_mode", ["avg", "maskclip", "clearclip"])
def test_tiny_export_each_dense_mode(tmp_path, dense_mode):
    manifest = run_export(create_model("world-tiny", dense_mode=dense_mode, seed=0), tmp_path, check_count=8)
    assert read_export(tmp_path).config.dense_mode == dense_mode
    assert manifest["parity"]["min_cosine"]["patch_embeds"] > 0.99999


def test_vit_b_16_export_has_real_shapes(tmp_path):
    manifest = run_export(create_model("ViT-B-16", seed=0), tmp_path, check_count=4)
    config = read_export(tmp_path).config
    assert config.grid_size == (14, 14) and config.embed_dim == 512 and config.dense_mode == "clearclip"
    assert manifest["parity"]["max_abs"]["patch_embeds"] < 1e-3
    backend = OnnxRuntimeBackend(read_export(tmp_path), "cpu")
    image_embeds, patch_embeds = backend.encode_images(np.zeros((3, 3, 224, 224), np.float32))
    assert image_embeds.shape == (3, 512) and patch_embeds.shape == (3, 512, 14, 14)
    assert backend.encode_texts(np.zeros((5, 77), np.int64)).shape == (5, 512)


def test_ttd_tag_through_onnxruntime_matches_torch(tiny_export, tmp_path):
    _, out, _ = tiny_export
    from ttd.data.annotations import write_world_split

    annotations = write_world_split(tmp_path / "world", seed=2, count=24, progress=False)
    results = {}
    for backend in ("torch", "onnxruntime"):
        target = tmp_path / f"{backend}.jsonl"
        args = ["tag", "--captions", str(annotations), "-o", str(target), "--quiet", "--backend", backend]
        args += ["--model", "world-tiny"] if backend == "torch" else ["--export-dir", str(out)]
        assert CliRunner().invoke(main, args).exit_code == 0
        results[backend] = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(results["torch"]) == len(results["onnxruntime"]) == 24
    for a, b in zip(results["torch"], results["onnxruntime"]):
        assert "error" not in a and "error" not in b and a["image"] == b["image"]
        assert [c["tag"] for c in a["candidates"]] == [c["tag"] for c in b["candidates"]] != []
        assert a["selected"] == b["selected"]
        np.testing.assert_allclose([c["score"] for c in a["candidates"]], [c["score"] for c in b["candidates"]], atol=1e-4)


def test_provider_choice_is_explicit():
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    with pytest.raises(ValueError, match="needs CUDAExecutionProvider, but this onnxruntime offers CPUExecutionProvider"):
        choose_providers("cuda", ["CPUExecutionProvider"])


def test_tensorrt_profiles_and_names():
    model = create_model("world-tiny")
    shapes = profiles("tag_head", model.config, BatchLimits(opt_batch=4, max_batch=16, opt_tags=8, max_tags=64))
    assert shapes["patch_views"] == ((1, 1, 128, 8, 8), (4, 1, 128, 8, 8), (16, 2, 128, 8, 8))
    # the negative prompts have their own input (room for 16), the tags theirs
    negatives = len(model.config.negative_prompts)
    assert negatives == 5 and shapes["tag_embeds"] == ((1, 1, 128), (4, 8, 128), (16, 64, 128))
    assert shapes["negative_embeds"] == ((1, 1, 128), (4, negatives, 128), (16, 16, 128))
    assert profiles("text_encoder", model.config, BatchLimits())["input_ids"][2] == (BatchLimits().max_batch * 8, 32)
    assert engine_name("image_encoder", "10.13.3.9", (9, 0), "fp16") == "image_encoder.trt10.13.sm90.fp16.plan"


def test_tensorrt_missing_gives_a_clear_error(tiny_export):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    _, out, _ = tiny_export
    with pytest.raises(RuntimeError, match="the tensorrt backend needs the tensorrt package"):
        load_tagger("tensorrt", export_dir=str(out))


def test_onnxruntime_never_falls_back_to_the_cpu_silently(tiny_export, monkeypatch):
    """This CPU build of onnxruntime cannot run CUDA; make it *claim* CUDA (the only fake: no GPU
    here) and ask for it: onnxruntime then quietly activates the CPU provider, and the backend's
    post-creation check must refuse that."""
    import onnxruntime as ort

    _, out, _ = tiny_export
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"asked for CUDAExecutionProvider but onnxruntime activated \['CPUExecutionProvider'\]"):
        OnnxRuntimeBackend(read_export(out), "cuda")
    assert OnnxRuntimeBackend(read_export(out), "cpu").providers == ["CPUExecutionProvider"]


def test_triton_build_and_validate_commands(tiny_export, tmp_path):
    _, out, _ = tiny_export
    repo = tmp_path / "repo"
    runner = CliRunner()
    built = runner.invoke(main, ["triton", "build", str(out), str(repo)])
    assert built.exit_code == 0, built.output
    valid = runner.invoke(main, ["triton", "validate", str(repo)])
    assert valid.exit_code == 0, valid.output
    assert "valid" in valid.output and "ttd_tagger" in valid.output
    config = next(repo.glob("ttd_image_encoder/config.pbtxt"))
    config.write_text(config.read_text().replace('name: "ttd_image_encoder"', 'name: "someone_else"'))
    broken = runner.invoke(main, ["triton", "validate", str(repo)])
    assert broken.exit_code == 2
    assert "ttd_image_encoder: config name 'someone_else' differs from its folder" in broken.output
