"""The GPU fast path's CPU-testable parts: batched tag-head calls, compiled-batch padding, the
torch backend on an export's weights, the CUDA-only branches' clear refusals, and the Triton
torch engine (python flavour) against the onnxruntime engine on a real tritonserver."""

import json
import os
import re

import numpy as np
import pytest
from ports import free_port
import torch
from click.testing import CliRunner

from ttd.cli import main
from ttd.runtime import load_tagger
from ttd.runtime.tagger import Tagger
from ttd.runtime.torch_backend import TorchBackend, padded_batch, pick_device

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def world_images():
    from ttd.data.world import make_sample

    samples = [make_sample(2, i) for i in range(6)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]


def _tagger(model, **options) -> Tagger:
    return Tagger(TorchBackend(model, "cpu"), model.config, mask_weight=model.mask_weight.item(),
                  mask_bias=model.mask_bias.item(), **options)


@pytest.mark.parametrize("score_method", ["negatives", "softmax", "sigmoid", "minmax"])
@pytest.mark.parametrize("flip_tta", [False, True])
def test_batched_tag_head_equals_one_image_at_a_time(tiny_model, score_method, flip_tta):
    """Tag lists of different lengths padded into one head call score exactly as one call per image."""
    tagger = _tagger(tiny_model, score_method=score_method, flip_tta=flip_tta)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    tag_lists = [["red", "circle"], ["blue", "square", "grass"], ["green", "star"], ["sand"],
                 ["yellow", "triangle", "heart"]]
    batched = tagger.tag(images, tag_lists, with_masks=True)
    assert [r.tags for r in batched] == tag_lists
    for i, tags in enumerate(tag_lists):
        alone = tagger.tag(images[i : i + 1], [tags], with_masks=True)[0]
        # float32 matmuls of another batch shape may round differently in the 7th digit
        np.testing.assert_allclose(batched[i].scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(batched[i].masks, alone.masks, atol=1e-5)
        assert batched[i].selected == alone.selected


def _counting(backend) -> dict[str, list[int]]:
    """Rows of every image-encoder and tag-head call the torch backend makes (wrapped, still run)."""
    calls: dict[str, list[int]] = {"encoder": [], "head": []}
    encoder, head = backend.image_encoder, backend.tag_head
    backend.image_encoder = lambda pixels: calls["encoder"].append(len(pixels)) or encoder(pixels)
    backend.tag_head = lambda views, *rest: calls["head"].append(len(views)) or head(views, *rest)
    return calls


@pytest.mark.parametrize("flip_tta", [False, True])
def test_the_encoder_runs_the_batch_once_and_only_the_head_is_split(tiny_model, monkeypatch, flip_tta):
    """A batch whose maps exceed the head's element budget: one encoder call of the whole batch
    (one compiled shape, no padded remainders), the head in chunks; plain and pipelined alike."""
    import ttd.runtime.tagger as tagger_module

    tagger = _tagger(tiny_model, flip_tta=flip_tta)
    images = np.random.default_rng(1).integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    vocabulary = ["red", "blue", "circle"]
    whole = tagger.tag_vocabulary(images, vocabulary)
    calls = _counting(tagger.backend)
    views = 2 if flip_tta else 1
    monkeypatch.setattr(tagger_module, "HEAD_ELEMENTS", 2 * views * 3 * 8 * 8)  # two images' maps per call
    chunked = tagger.tag(images, [vocabulary] * 7)  # per-image lists, chunked
    assert calls == {"encoder": [7 * views], "head": [2, 2, 2, 1]}
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    calls["encoder"].clear(), calls["head"].clear()
    scores = tagger.submit(images, [vocabulary] * 7).wait().scores
    assert calls == {"encoder": [7 * views], "head": [2, 2, 2, 1]}
    np.testing.assert_array_equal(scores, np.stack([r.scores for r in chunked]))


def test_new_tags_are_text_encoded_in_large_fixed_calls_once(tiny_model):
    """The text encoder runs `text_rows` texts a call (a GPU's 256: few calls, one synchronise
    each), every call the same shape, each tag once per Tagger; an embedding does not depend on
    the call's size or company (the bytes of a resumed job)."""
    import ttd.runtime.torch_backend as torch_backend

    backend = TorchBackend(tiny_model, "cpu")
    backend.text_rows = 64  # as the device's setting, at a size the CPU runs quickly
    large, small = _tagger(tiny_model), _tagger(tiny_model)
    large.backend = backend
    large.text_rows = backend.text_rows
    large.negative_embeds  # the model's negative prompts, encoded once before counting
    calls = []
    encode = backend.encode_texts
    backend.encode_texts = lambda ids: calls.append(len(ids)) or encode(ids)
    templates = len(tiny_model.config.prompt_templates)
    words = [f"w{i}" for i in range(100)]
    tag_lists = [words[i : i + 10] for i in range(0, 100, 10)]
    request = large.request(tag_lists)  # a batch's 100 new tags: together
    assert calls == [64] * -(-100 * templates // 64)
    calls.clear()
    large.request(tag_lists[::-1])  # cached: no text-encoder call
    assert calls == []
    np.testing.assert_allclose(request.tag_embeds[3, :10], small.encode_tags(words[30:40]), atol=1e-5)
    # a CPU pads less (8 a call); on cuda the backend takes the device's 256
    assert TorchBackend(tiny_model, "cpu").text_rows == 8 and torch_backend.DEVICE_TEXT_ROWS == 256


def test_batch_size_auto_is_chosen_by_device(tmp_path):
    """--batch-size auto: 256 images a batch on a GPU (32 is launch-bound there), the CPU defaults
    on a CPU; whole images fewer (each full-size image is held in memory)."""
    import click

    from ttd.cli.common import BatchSize
    from ttd.data.world import make_sample
    from ttd.runtime.hardware import auto_batch_size

    assert [auto_batch_size(d) for d in ("cpu", "cuda", "cuda:1", "tensorrt")] == [32, 256, 256, 256]
    assert [auto_batch_size(d, "whole") for d in ("cpu", "cuda:0")] == [8, 64]
    if not CUDA:
        assert auto_batch_size("auto") == auto_batch_size(None) == 32
    kind = BatchSize()
    assert [kind.convert(v, None, None) for v in ("auto", "64", 7, None)] == ["auto", 64, 7, None]
    for bad in ("0", "-3", "big"):
        with pytest.raises(click.BadParameter, match="number of images ≥ 1 or auto"):
            kind.convert(bad, None, None)
    sample = make_sample(2, 0)
    from PIL import Image

    Image.fromarray(sample.image).save(tmp_path / "a.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "caption": sample.caption}) + "\n")
    done = CliRunner().invoke(main, ["tag", "--captions", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                                     "--device", "cpu", "--batch-size", "auto", "--quiet"])
    assert done.exit_code == 0, done.output
    assert "wrote 1 record" in done.output


def test_onnxruntime_gets_the_gpu_index_of_cuda_n():
    from ttd.runtime.onnxruntime_backend import with_device_id

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert with_device_id(providers, "cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert with_device_id(["TensorrtExecutionProvider", *providers], "tensorrt:2")[:2] == \
        [("TensorrtExecutionProvider", {"device_id": 2}), ("CUDAExecutionProvider", {"device_id": 2})]
    assert with_device_id(providers, "cuda") == providers and with_device_id(["CPUExecutionProvider"], "cpu") == \
        ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="GPU index after ':' must be a number"):
        with_device_id(providers, "cuda:first")


def test_texts_run_at_their_own_length_with_the_full_contexts_embeddings():
    """A causal text tower pooled at the end token: ids cut after it give the full context's
    embedding, so each text runs at its length rounded up to PREFIX_STEP (a third of the work for
    a world caption); texts are grouped by that length, so an embedding depends on its text alone."""
    from ttd.data.world import make_sample
    from ttd.runtime.tagger import PREFIX_STEP

    tagger = load_tagger("torch", device="cpu")
    captions = [make_sample(7, i).caption for i in range(12)] + ["circle", "a red circle on grass"]
    full = tagger.backend.encode_texts(tagger.tokenizer(captions))  # the whole context, as exported graphs run it
    widths = []
    encode = tagger.backend.encode_texts
    tagger.backend.encode_texts = lambda ids: widths.append(ids.shape) or encode(ids)
    cut = tagger.encode_texts(captions)
    np.testing.assert_allclose(cut, full, atol=2e-6)
    context = tagger.config.context_length
    assert all(rows == tagger.text_rows and width % PREFIX_STEP == 0 and width < context for rows, width in widths)
    assert len({width for _, width in widths}) >= 2 and sum(width for _, width in widths) <= len(widths) * context / 2
    alone = tagger.encode_texts(["circle"])
    assert np.array_equal(alone[0], cut[12])  # the same bits with or without long companions


def test_padded_batch_is_the_next_power_of_two():
    assert [padded_batch(n) for n in (1, 2, 3, 4, 5, 100, 256, 257)] == [1, 2, 4, 4, 8, 128, 256, 512]


def test_compiled_encoder_pads_partial_batches_and_returns_only_the_real_rows(tiny_model):
    plain = TorchBackend(tiny_model, "cpu")
    padded = TorchBackend(tiny_model, "cpu")
    seen = []
    encoder = padded.image_encoder
    padded.image_encoder = lambda pixels: seen.append(pixels.shape[0]) or encoder(pixels)
    padded.compiled = True  # the padding path without paying for a compilation on the CPU
    pixels = np.random.default_rng(2).standard_normal((5, 3, 64, 64)).astype(np.float32)
    expected, got = plain.encode_images(pixels), padded.encode_images(pixels)
    assert seen == [8]
    assert [g.shape for g in got] == [e.shape for e in expected] == [(5, 128), (5, 128, 8, 8)]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_requests_fail_clearly_without_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available on this machine"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"
    for args in (["eval", "--count", "2", "--device", "cuda"],
                 ["train", "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "run")],
                 ["tag", "--captions", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--device", "cuda"]):
        if args[0] == "tag":
            (tmp_path / "x.jsonl").write_text('{"image": "a.png", "caption": "a red circle"}\n')
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0
        assert "CUDA is not available on this machine" in result.output, (args, result.output)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from export.pipeline import run_export
    from ttd.model.factory import create_model

    out = tmp_path_factory.mktemp("export")
    run_export(create_model("world-tiny", seed=0), out, check_count=8)
    return out


def test_torch_backend_runs_the_exports_own_weights(export_dir, world_images):
    """`--backend torch --export-dir` is the exported model: same answers as onnxruntime."""
    from ttd.model.tags import candidate_tags

    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    images, captions = world_images
    tag_lists = [candidate_tags(c) for c in captions]
    torch_results = load_tagger("torch", export_dir=str(export_dir), device="cpu").tag(images, tag_lists)
    ort_results = load_tagger("onnxruntime", export_dir=str(export_dir), device="cpu").tag(images, tag_lists)
    for a, b in zip(torch_results, ort_results, strict=True):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        assert a.selected == b.selected


def test_export_without_torch_weights_says_how_to_get_them(tmp_path):
    from export.pipeline import run_export
    from export.triton import build_repository
    from ttd.model.factory import create_model
    from ttd.runtime.export_dir import ExportError

    out = tmp_path / "export"
    run_export(create_model("world-tiny", seed=0), out, check_count=4, torch_weights=False)
    assert not (out / "model.safetensors").exists()
    with pytest.raises(ExportError, match="has no model.safetensors .* re-export with `ttd export`"):
        load_tagger("torch", export_dir=str(out))
    with pytest.raises(ExportError, match="has no model.safetensors"):
        build_repository(out, tmp_path / "repo", "python", "torch")


def test_torch_engine_repository_validates_and_keeps_the_tagger_on_the_cpu(export_dir, tmp_path):
    from export.triton import RepositoryError, build_repository, validate_repository

    result = CliRunner().invoke(main, ["triton", "build", str(export_dir), str(tmp_path / "repo"), "--graph-engine", "torch",
                                       "--kind", "KIND_GPU", "--torch-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    repo = tmp_path / "repo"
    for model in ("ttd_image_encoder", "ttd_text_encoder", "ttd_tag_head"):
        config = (repo / model / "config.pbtxt").read_text()
        assert "kind: KIND_GPU" in config and 'key: "engine" value: { string_value: "torch" }' in config
        assert 'key: "dtype" value: { string_value: "bf16" }' in config
        assert (repo / model / "1" / "model.safetensors").is_file() and not (repo / model / "1" / "model.onnx").exists()
    assert "kind: KIND_CPU" in (repo / "ttd_tagger" / "config.pbtxt").read_text()
    (repo / "ttd_tag_head" / "1" / "model.safetensors").unlink()
    with pytest.raises(RepositoryError, match="ttd_tag_head/1: model.safetensors is missing \\(torch engine\\)"):
        validate_repository(repo)
    with pytest.raises(ValueError, match="the native flavour serves engines onnx or tensorrt, not 'torch'"):
        build_repository(export_dir, tmp_path / "other", "native", "torch")


def test_triton_torch_engine_answers_as_the_onnxruntime_engine(export_dir, tmp_path, monkeypatch):
    """The python flavour with the torch engine (KIND_CPU here; KIND_GPU on a GPU server) on a
    real tritonserver gives the tags that direct onnxruntime gives."""
    pytest.importorskip("tritonclient")
    from export.triton import BatchingOptions, build_repository
    from ttd.data.annotations import write_world_split
    from ttd.serve.triton_server import start_server

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo = build_repository(export_dir, tmp_path / "repo", "python", "torch",
                            batching=BatchingOptions(max_batch_size=8, preferred_batch_sizes=(4,)))
    annotations = write_world_split(tmp_path / "world", seed=2, count=10, progress=False)
    outputs = {}
    with start_server(repo, http_port=free_port(), grpc_port=free_port()) as server:
        for name, extra in (("onnxruntime", []), ("triton", ["--url", f"http://{server.http_url}"])):
            target = tmp_path / f"{name}.jsonl"
            result = CliRunner().invoke(main, ["tag", "--captions", str(annotations), "-o", str(target), "--quiet",
                                               "--backend", name, "--export-dir", str(export_dir), *extra])
            assert result.exit_code == 0, result.output
            outputs[name] = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(outputs["triton"]) == len(outputs["onnxruntime"]) == 10
    for served, direct in zip(outputs["triton"], outputs["onnxruntime"], strict=True):
        assert "error" not in served and served["selected"] == direct["selected"]
        np.testing.assert_allclose([c["score"] for c in served["candidates"]],
                                   [c["score"] for c in direct["candidates"]], atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_on_device_normalisation_equals_the_host_path(tiny_model, compiled):
    """Tagger hands uint8 images to a backend that normalises on its device: same embeddings as
    `encode_images(normalize(...))`, with and without flip TTA and compiled-batch padding."""
    from ttd.runtime.images import normalize

    backend = TorchBackend(tiny_model, "cpu")
    backend.compiled = compiled  # padding path only (no compilation on the CPU)
    images = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    config = tiny_model.config
    expected = backend.encode_images(normalize(images, config.mean, config.std))
    tagger = Tagger(backend, config, flip_tta=True)
    request = tagger.request([["red", "circle"]] * 3, with_cosines=True)
    on_device = backend.tag_images(images, tagger.preprocessing, request)
    views = np.stack([expected.patch_embeds,
                      backend.encode_images(normalize(images[:, :, ::-1], config.mean, config.std))[1][..., ::-1]], 1)
    on_host = backend.score_tags(views, request)
    for e, g in zip(on_host, on_device, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=1e-5)
    np.testing.assert_allclose(tagger.encode_images(images)[1], views, atol=1e-6)


def test_decoding_worker_processes_write_what_the_main_process_writes(tiny_model, tmp_path):
    """`ttd tag` with decoding processes (overlapping the model) gives the records, errors
    included and in input order, that decoding in the main process gives."""
    from ttd.data.annotations import write_world_split
    from ttd.data.items import read_captions
    from ttd.jobs.stream_job import tag_stream

    annotations = write_world_split(tmp_path / "world", seed=2, count=9, progress=False)
    (tmp_path / "world" / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    with annotations.open("a") as f:
        f.write(json.dumps({"image": "images/broken.png", "caption": "a red circle"}) + "\n")
        f.write(json.dumps({"image": "images/missing.png", "caption": "a blue square"}) + "\n")
    items = read_captions(annotations)
    tagger = _tagger(tiny_model)
    outputs = {}
    for workers in (0, 2):
        target = tmp_path / f"w{workers}.jsonl"
        summary = tag_stream(tagger, items, target, batch_size=4, progress=False, decode_workers=workers)
        assert (summary.items, sum(summary.errors.values())) == (11, 2)
        # PIL names the BytesIO object it could not identify by its address: not part of the answer
        text = re.sub(r" at 0x[0-9a-f]+", "", target.read_text())
        outputs[workers] = [json.loads(line) for line in text.splitlines()]
    assert outputs[2] == outputs[0]
    assert [r["image"] for r in outputs[2]] == [i.image for i in items]
    assert "cannot decode image" in outputs[2][9]["error"] and "error" not in outputs[2][0]


def test_gpu_check_dry_run_lists_every_step_checks_the_device_imports_and_runs_nothing(tmp_path):
    """The dry run lists every step and says, for every module the steps import on the device,
    whether the device has it or a carried wheel brings it; a missing one makes it NOT READY."""
    import subprocess
    import sys
    from pathlib import Path

    import benchmarks.gpu_check as gpu_check

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    wheels, inputs = tmp_path / "wheels", tmp_path / "inputs"
    wheels.mkdir(), inputs.mkdir()
    for name in ("open_clip_torch-3.3.0-py3-none-any.whl", "ftfy-6.3.1-py3-none-any.whl",
                 "wcwidth-0.2.13-py2.py3-none-any.whl", "regex-2026.12.2-cp312-cp312-manylinux_2_28_x86_64.whl",
                 "torchvision-0.26.0-cp312-cp312-manylinux_2_28_x86_64.whl"):
        (wheels / name).write_bytes(b"")
    for name in gpu_check.PHOTO_NAMES:
        (inputs / name).write_bytes(b"")

    def dry_run():
        return subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path / "out"), "--inputs", str(inputs)],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHON": sys.executable, "TTD_WHEELS": str(wheels)})

    done = dry_run()
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("environment", "matmul_peak", "parity", "tag_cli", "throughput", "compile", "tag_end_to_end",
                 "device_decode", "train_eval"):
        assert f"  {step}: (≤ " in done.stdout
    assert "tuned 16384 images per run (bf16, batch auto), default 4096 (fp32, eager, batch 32)" in done.stdout
    assert "224-px PNGs, 500x375 JPEGs, 1024x768 JPEGs" in done.stdout and "open vocabulary of 5000" in done.stdout
    assert "torchvision: carried (torchvision-0.26.0" in done.stdout and "not accounted for: none" in done.stdout
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in done.stdout and done.stdout.rstrip().endswith("READY")
    assert "dry run; would install 5 wheels" in done.stderr and not (tmp_path / "out").exists()
    (wheels / "torchvision-0.26.0-cp312-cp312-manylinux_2_28_x86_64.whl").unlink()
    done = dry_run()
    assert done.returncode == 2 and "torchvision: MISSING" in done.stdout and "NOT READY" in done.stdout


def test_gpu_check_runs_end_to_end_on_the_cpu_with_small_settings(tmp_path):
    """The script's own code paths (every step but compile and training), before a GPU is at hand."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    prepared = subprocess.run([sys.executable, str(script), "--prepare", "--inputs", str(tmp_path / "photos")],
                              capture_output=True, text=True, timeout=120)
    if prepared.returncode != 0:
        pytest.skip(f"no real photos to make inputs from: {prepared.stdout}{prepared.stderr}")
    steps = ["environment", "matmul_peak", "parity", "tag_cli", "throughput", "tag_end_to_end", "device_decode"]
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--vit-model", "world-tiny",
                           "--batches", "2", "--compile-batches", "--world-images", "4", "--e2e-images", "8",
                           "--default-images", "8", "--parity-pairs", "8", "--photos", "4", "--inputs",
                           str(tmp_path / "photos"), "--open-words", "40", "--vocabulary-tags", "40",
                           "--decode-workers", "1", "--steps", *steps, "--out", str(tmp_path),
                           "--step-limit-s", *["400"] * 9],  # the limits are a GPU's; a shared CPU is slower
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and set(report["steps"]) == set(steps)
    parity = report["steps"]["parity"]["result"]["rows"]
    assert parity["world-base float32"]["gate"] == "pass" and parity["world-base float32"]["tag_agreement"] == 1.0
    assert report["steps"]["tag_cli"]["result"]["rows"]["cpu bfloat16"]["agreement"] >= 0.95
    assert "| float32 b2 |" in (tmp_path / "gpu_check.md").read_text()
    e2e = report["steps"]["tag_end_to_end"]["result"]["rows"]
    assert e2e["pipelined vs plain records"]["identical_captions"] == 1.0
    assert e2e["pipelined vs plain records"]["identical_vocabulary"] == 1.0
    for name in ("tuned", "default"):
        assert e2e[f"{name}: encoder alone"]["images_per_s"] > 0
        for kind in ("224-px PNGs", "500x375 JPEGs", "1024x768 JPEGs"):
            row = e2e[f"{name}: ttd tag, {kind}"]
            assert row["images"] == 8 and row["errors"] == 0 and row["encode_ms_per_1k"] > 0
            assert row["decode_ms_per_1k"] > 0 and row["main_cpu_ms_per_1k"] > 0 and row["gpu_ms_per_1k"] > 0
    assert e2e["tuned: ttd tag, open vocabulary of 40 caption words, 500x375 JPEGs"]["errors"] == 0
    whole = e2e["tuned: ttd segment --captions (whole images), 224-px PNGs"]
    assert whole["images"] == 8 and whole["errors"] == 0 and whole["p9_ratio_to_encoder_alone"] > 0
    decoded = report["steps"]["device_decode"]["result"]["rows"]
    assert decoded["agreement, world JPEGs, captions"]["agreement"] >= 0.99
    assert decoded["agreement, 500x375 JPEGs (real photos), world vocabulary"]["images"] == 4
    assert decoded["nvJPEG, 1024x768 JPEGs"]["tag_from_bytes_images_per_s"] > 0
    job = decoded["ttd tag --decode device, 1024x768 JPEGs"]
    assert job["errors"] == 0 and job["images_per_s"] > 0 and "device decoding on" in job["gate"]
