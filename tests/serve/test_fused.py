"""The fused flavour (docs/serving.md, "The fused flavour"): ttd_tagger alone, holding the
runtime, answers exactly what `ttd tag` writes for the same export."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from ports import free_port

from export.triton import BatchingOptions, build_repository, validate_repository
from ttd.cli import main

pytest.importorskip("tritonclient")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

WORLD = Path(__file__).resolve().parents[2] / "examples" / "world"


def served_record(answer: dict) -> dict:
    """A ttd_tagger answer in the shape of a `ttd tag` record's candidates and selection."""
    return {"candidates": [{"tag": t, "score": round(float(s), 6)} for t, s in zip(answer["tags"], answer["scores"])],
            "selected": [t for t, chosen in zip(answer["tags"], answer["selected"]) if chosen]}


def rgb_request(http, client, image: np.ndarray, caption: str) -> dict:
    inputs = []
    for name, array, dtype in (("image_rgb", image[None], "UINT8"),
                               ("caption", np.array([[caption.encode()]], dtype=np.object_), "BYTES")):
        tensor = http.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("ttd_tagger", inputs)
    return {"tags": [t.decode() for t in result.as_numpy("tags")[0]], "scores": result.as_numpy("scores")[0],
            "selected": result.as_numpy("selected")[0].astype(bool)}


def test_fused_repository_is_the_tagger_alone(export_dir, tmp_path):
    result = CliRunner().invoke(main, ["triton", "build", str(export_dir), str(tmp_path / "repo"), "--flavour", "fused",
                                       "--max-batch-size", "16", "--preferred-batch-sizes", "4,8"])
    assert result.exit_code == 0, result.output
    assert validate_repository(tmp_path / "repo") == ["ttd_tagger: python, max_batch_size 16, version 1"]
    config = (tmp_path / "repo" / "ttd_tagger" / "config.pbtxt").read_text()
    assert 'name: "image_rgb" data_type: TYPE_UINT8 dims: [ 64, 64, 3 ]' in config
    assert 'key: "engine" value: { string_value: "onnx" }' in config and "kind: KIND_CPU" in config
    assert 'key: "model_batch" value: { string_value: "2" }' in config  # CPU: half the smallest preferred batch
    assert 'key: "decode_threads" value: { string_value: "2" }' in config
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["ttd_repository.json", "ttd_tagger"]
    # on a GPU: the torch backend in the instance's device, larger model calls (config only: no GPU here)
    gpu = build_repository(export_dir, tmp_path / "gpu", "fused", "torch",
                           BatchingOptions(kind="KIND_GPU"), torch_dtype="bf16")
    config = (gpu / "ttd_tagger" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config and 'key: "engine" value: { string_value: "torch" }' in config
    assert 'key: "dtype" value: { string_value: "bf16" }' in config and 'key: "model_batch" value: { string_value: "8" }' in config
    assert (gpu / "ttd_tagger" / "1" / "export" / "model.safetensors").is_file()
    validate_repository(gpu)
    with pytest.raises(ValueError, match="has no TensorRT engine for"):
        build_repository(export_dir, tmp_path / "trt", "fused", "tensorrt")


def test_fused_tagger_answers_what_ttd_tag_writes(export_dir, tmp_path, monkeypatch):
    import tritonclient.http as http
    from PIL import Image

    from load_client import load_test, tagger_request
    from ttd.runtime import load_tagger
    from ttd.serve.triton_server import start_server

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    direct = tmp_path / "direct.jsonl"
    result = CliRunner().invoke(main, ["tag", "--captions", str(WORLD / "annotations.jsonl"), "-o", str(direct), "--quiet",
                                       "--backend", "onnxruntime", "--export-dir", str(export_dir)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in direct.read_text().splitlines()]
    assert len(records) == 8 and any(r["selected"] for r in records)
    runtime = load_tagger("onnxruntime", export_dir=str(export_dir), device="cpu", threads=1, warn_unfitted=False)
    repo = build_repository(export_dir, tmp_path / "repo", "fused")
    # model calls of 2 images: under concurrent clients decoding overlaps the model (the default 4
    # would rarely split a batch of this load)
    config = repo / "ttd_tagger" / "config.pbtxt"
    config.write_text(config.read_text().replace('"model_batch" value: { string_value: "4" }',
                                                 '"model_batch" value: { string_value: "2" }'))
    assert '"model_batch" value: { string_value: "2" }' in config.read_text()
    with start_server(repo, http_port=free_port(), grpc_port=None, timeout_s=120) as server:
        client = http.InferenceServerClient(server.http_url, network_timeout=60)
        with pytest.raises(ValueError, match="does not serve ttd_image_encoder .*: --backend triton runs the graph models"):
            load_tagger("triton", url=f"http://{server.http_url}", export_dir=str(export_dir))
        mismatches = 0
        for record in records:
            data = (WORLD / record["image"]).read_bytes()
            by_bytes = served_record(tagger_request(http, client, data, record["caption"]))
            pixels = runtime.preprocess(data, record["image"])
            by_rgb = served_record(rgb_request(http, client, pixels, record["caption"]))
            want = {"candidates": record["candidates"], "selected": record["selected"]}
            mismatches += (by_bytes != want) + (by_rgb != want)
        assert mismatches == 0
        # masks only when asked, and the runtime's own masks
        first = records[0]
        data = (WORLD / first["image"]).read_bytes()
        answer = tagger_request(http, client, data, first["caption"], return_masks=True)
        expected = runtime.tag(runtime.prepare([data]), [answer["tags"]], with_masks=True)[0]
        np.testing.assert_allclose(answer["masks"], expected.masks, atol=1e-6)
        plain = client.infer("ttd_tagger", [_bytes_input(http, "image", data), _bytes_input(http, "caption", b"a red circle")])
        assert plain.as_numpy("masks") is None and plain.as_numpy("tags") is not None
        # concurrent clients: the dynamic batcher groups requests, the answers stay the same
        pairs = [((WORLD / r["image"]).read_bytes(), r["caption"]) for r in records]
        expected_answers = [{"tags": [c["tag"] for c in r["candidates"]],
                             "scores": np.array([c["score"] for c in r["candidates"]]),
                             "selected": np.array([c["tag"] in r["selected"] for c in r["candidates"]])}
                            for r in records]
        report = load_test(server.http_url, pairs, expected_answers, clients=4, total=32, atol=1e-5)
        assert report.summary()["requests"] == 32 and not report.errors and not report.mismatches
        # refusals name the problem (HTTP 400), and the model serves on afterwards
        with pytest.raises(Exception, match="cannot decode image"):
            tagger_request(http, client, b"not an image", "a red circle")
        with pytest.raises(Exception, match="2000 tags exceed the limit of 1024"):
            tagger_request(http, client, data, tags=[f"t{i}" for i in range(2000)])
        with pytest.raises(Exception, match="empty caption"):
            tagger_request(http, client, data, "  ")
        with pytest.raises(Exception, match="send one image"):
            client.infer("ttd_tagger", [_bytes_input(http, "caption", b"a red circle")])
        assert served_record(tagger_request(http, client, data, first["caption"]))["selected"] == first["selected"]


def _bytes_input(http, name: str, value: bytes):
    tensor = http.InferInput(name, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
    return tensor
