import json
import sys

import numpy as np
import pytest
from ports import free_port
from click.testing import CliRunner

from export.triton import BatchingOptions, RepositoryError, build_repository, validate_repository
from ttd.cli import main

pytest.importorskip("tritonclient")


@pytest.mark.parametrize("flavour", ["python", "native"])
def test_both_flavours_validate(export_dir, tmp_path, flavour):
    result = CliRunner().invoke(main, ["triton", "build", str(export_dir), str(tmp_path / "repo"), "--flavour", flavour,
                                       "--max-batch-size", "16", "--preferred-batch-sizes", "4,8"])
    assert result.exit_code == 0, result.output
    summary = validate_repository(tmp_path / "repo")
    engine = "python" if flavour == "python" else "onnxruntime_onnx"
    assert f"ttd_image_encoder: {engine}, max_batch_size 16, version 1" in summary
    assert "ttd_tagger: python, max_batch_size 16, version 1" in summary


def test_invalid_repositories_are_rejected(export_dir, tmp_path):
    repo = build_repository(export_dir, tmp_path / "repo", "native")
    config = repo / "ttd_text_encoder" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 32 ]", "dims: [ 77 ]").replace("max_batch_size: 32", "max_batch_size: 8"))
    with pytest.raises(RepositoryError) as error:
        validate_repository(repo)
    message = str(error.value)
    assert "ttd_text_encoder: inputs [('input_ids', 'TYPE_INT64', [77])] do not match the ONNX graph's [('input_ids', 'TYPE_INT64', [32])]" in message
    assert "preferred batch size 16 > max_batch_size 8" in message
    assert "inconsistent max_batch_size across models" in message
    (repo / "ttd_tag_head" / "config.pbtxt").write_text('name: "ttd_tag_head"\nplatform: "onnxruntime_onnx"\nmax_batch_size: [')
    with pytest.raises(RepositoryError, match="ttd_tag_head/config.pbtxt does not parse"):
        validate_repository(repo)
    with pytest.raises(ValueError, match="preferred batch sizes \\(64,\\) must lie in 1..32"):
        build_repository(export_dir, tmp_path / "other", batching=BatchingOptions(preferred_batch_sizes=(64,)))


@pytest.mark.deadline(600)
def test_real_tritonserver_serves_the_same_tags_as_onnxruntime(export_dir, tmp_path, monkeypatch):
    from ttd.data.annotations import write_world_split
    from benchmarks.load_client import load_test, tagger_request
    from ttd.serve.triton_server import start_server

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo = build_repository(export_dir, tmp_path / "repo", "python",
                            batching=BatchingOptions(max_batch_size=8, preferred_batch_sizes=(4,)))
    annotations = write_world_split(tmp_path / "world", seed=2, count=12, progress=False)
    http_port, grpc_port = free_port(), free_port()
    with start_server(repo, http_port=http_port, grpc_port=grpc_port) as server:
        assert server.http_url.startswith("127.0.0.1:")
        outputs = {}
        for name, extra in (("onnxruntime", []), ("http", ["--url", f"http://{server.http_url}"]),
                            ("grpc", ["--url", f"grpc://{server.grpc_url}"])):
            target = tmp_path / f"{name}.jsonl"
            backend = "onnxruntime" if name == "onnxruntime" else "triton"
            result = CliRunner().invoke(main, ["tag", "--captions", str(annotations), "-o", str(target), "--quiet",
                                               "--backend", backend, "--export-dir", str(export_dir), *extra])
            assert result.exit_code == 0, result.output
            outputs[name] = [json.loads(line) for line in target.read_text().splitlines()]
        assert outputs["http"] == outputs["onnxruntime"]
        assert outputs["grpc"] == outputs["onnxruntime"]
        # segmentation through the served graphs (whole image, two scales, sliding windows): the same label maps
        images = [str(p) for p in sorted((annotations.parent / "images").glob("*.png"))[:3]]
        segments = {}
        for name, extra in (("onnxruntime", []), ("http", ["--url", f"http://{server.http_url}"])):
            target = tmp_path / f"segment-{name}.jsonl"
            result = CliRunner().invoke(main, ["segment", "--classes", "red,blue,circle,grass", *images, "-o", str(target),
                                               "--scales", "1,2", "--stride", "32", "--mask-threshold", "0.01", "--quiet", "--backend",
                                               "onnxruntime" if name == "onnxruntime" else "triton",
                                               "--export-dir", str(export_dir), *extra])
            assert result.exit_code == 0, result.output
            segments[name] = [json.loads(line) for line in target.read_text().splitlines()]
        assert len(segments["http"]) == 3 and any(r["segments"] for r in segments["http"])
        assert segments["http"] == segments["onnxruntime"]

        import io

        import tritonclient.http as http
        from PIL import Image

        client = http.InferenceServerClient(server.http_url)
        pairs, expected = [], []
        for record in outputs["onnxruntime"][:6]:
            buffer = io.BytesIO()
            Image.open(annotations.parent / record["image"]).save(buffer, "PNG")
            pairs.append((buffer.getvalue(), record["caption"]))
            expected.append({"tags": [c["tag"] for c in record["candidates"]],
                             "scores": np.array([c["score"] for c in record["candidates"]]),
                             "selected": np.array([c["tag"] in record["selected"] for c in record["candidates"]])})
        answer = tagger_request(http, client, pairs[0][0], pairs[0][1], return_masks=True)
        assert answer["tags"] == expected[0]["tags"] and answer["masks"].shape == (len(answer["tags"]), 8, 8)
        report = load_test(server.http_url, pairs, expected, clients=3, total=24, atol=1e-5)
        assert report.summary()["requests"] == 24 and not report.errors and not report.mismatches
        with pytest.raises(Exception, match="cannot decode image"):
            tagger_request(http, client, b"not an image", "a red circle")
        with pytest.raises(Exception, match="2000 tags exceed the limit of 1024"):
            tagger_request(http, client, pairs[0][0], tags=[f"t{i}" for i in range(2000)])
        with pytest.raises(Exception, match="empty caption"):
            tagger_request(http, client, pairs[0][0], "  ")
        assert client.is_server_ready() and client.is_model_ready("ttd_tagger")
        again = load_test(server.http_url, pairs, expected, clients=2, total=6)
        assert again.summary()["errors"] == 0 and not again.mismatches


def test_serve_refuses_a_folder_that_is_not_a_repository(tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "is not a TTD model repository" in result.output


@pytest.mark.deadline(60)
def test_serve_refuses_coalescing_for_a_repository_whose_tagger_takes_one_image(export_dir, tmp_path):
    """--coalesce sends several-image requests: the python flavour's tagger takes one image a
    request, so it is refused before tritonserver starts instead of silently forwarding as it came."""
    repo = build_repository(export_dir, tmp_path / "repo", "python")
    result = CliRunner().invoke(main, ["serve", str(repo), "--coalesce", "2", "--http-port", "1"])
    assert result.exit_code == 2 and "--coalesce sends several images a request, which only the fused tagger takes; " \
        f"{repo} is the python flavour" in result.output, result.output


@pytest.mark.deadline(300)
def test_ttd_serve_stops_cleanly_on_ctrl_c(export_dir, tmp_path):
    import signal
    import subprocess
    import time
    import urllib.request

    repo = build_repository(export_dir, tmp_path / "repo", "python")
    port = free_port()
    # started with SIGINT ignored, as a background job of a non-interactive shell is (`nohup ttd serve &`):
    # Ctrl-C / kill -INT must still stop it
    process = subprocess.Popen([sys.executable, "-m", "ttd", "serve", str(repo), "--http-port", str(port),
                                "--grpc-port", str(free_port())], stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = process.stderr.readline()  # printed once the server is ready
        assert f"HTTP 127.0.0.1:{port}" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        time.sleep(0.5)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()


def test_python_graph_models_of_an_fp16_export_avoid_the_crashing_optimisations(tmp_path):
    """The Triton graph models open their onnxruntime sessions with the backend's own options:
    for an fp16 export EXTENDED, not ALL (whose CPU layout passes crash the stub on fp16 graphs)."""
    import onnxruntime as ort

    from export.pipeline import run_export
    from export.triton import build_repository
    from ttd.model.factory import create_model
    from ttd.runtime.onnxruntime_backend import session_options

    run_export(create_model("world-tiny", seed=0), tmp_path / "fp16", "fp16", check_count=4)
    repo = build_repository(tmp_path / "fp16", tmp_path / "repo")
    assert 'key: "precision" value: { string_value: "fp16" }' in (repo / "ttd_image_encoder" / "config.pbtxt").read_text()
    assert session_options("fp16", True).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert session_options("fp32", True).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.deadline(120)
def test_a_flipped_byte_in_a_repository_is_refused_by_validate_and_serve(export_dir, tmp_path):
    """Issue 23, item 16: `ttd triton validate` said "valid" for a repository whose model.onnx had
    one byte flipped, and `ttd serve` served it. The build records every file's sha256."""
    repo = build_repository(export_dir, tmp_path / "repo", "python")
    runner = CliRunner()
    assert runner.invoke(main, ["triton", "validate", str(repo)]).exit_code == 0
    graph = repo / "ttd_image_encoder" / "1" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    expected = "ttd_image_encoder/1/model.onnx is not the file `ttd triton build` wrote (sha256 differs"
    checked = runner.invoke(main, ["triton", "validate", str(repo)])
    assert checked.exit_code == 2 and expected in checked.output, checked.output
    served = runner.invoke(main, ["serve", str(repo), "--http-port", "1"])  # refused before tritonserver starts
    assert served.exit_code == 2 and f"{repo} is not served: {expected}" in served.output, served.output
    assert "Traceback" not in served.output
    (repo / "ttd_tagger" / "1" / "model.py").unlink()
    with pytest.raises(RepositoryError, match=r"ttd_tagger/1/model.py is missing"):
        validate_repository(repo)
    (repo / "ttd_repository.json").unlink()
    with pytest.raises(RepositoryError, match=r"no ttd_repository.json: not built by `ttd triton build`"):
        validate_repository(repo)


def test_edited_configs_are_not_a_hash_problem(export_dir, tmp_path):
    repo = build_repository(export_dir, tmp_path / "repo", "native")
    config = repo / "ttd_tag_head" / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 1", "count: 2"))
    validate_repository(repo)
