"""`ttd serve --metrics-port` (docs/serving.md, "Metrics"): a known load is counted — good
requests, refusals by reason, latency observations, tritonserver's own counts and a restart —
read back with prometheus_client's text parser."""

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from ports import free_port

from export.pipeline import run_export
from export.triton import build_repository
from ttd.model.factory import create_model

pytest.importorskip("tritonclient")
parser = pytest.importorskip("prometheus_client.parser")

WORLD = Path(__file__).resolve().parents[2] / "examples" / "world"
ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> dict:
    """{(sample name, sorted labels): value} of the metrics port's answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def wait_for_line(process: subprocess.Popen, needle: str, deadline_s: float) -> str:
    """The first stderr line containing `needle`, or a failure after `deadline_s` seconds."""
    deadline = time.monotonic() + deadline_s
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.5)
        if ready:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            seen.append(line)
            if needle in line:
                return line
    pytest.fail(f"no line with {needle!r} within {deadline_s} s; got: {''.join(seen)[-2000:]}")


def post(port: int, path: str, body: bytes, content_type: str = "application/json") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def infer_body(image: bytes, caption: str) -> bytes:
    """A JSON ttd_tagger request whose image is `image` (ASCII bytes: a JSON string)."""
    return json.dumps({"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [image.decode("latin-1")]},
        {"name": "caption", "datatype": "BYTES", "shape": [1, 1], "data": [caption]}]}).encode()


def test_metrics_count_a_known_load(tmp_path):
    import tritonclient.http as http

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from load_client import tagger_request

    export = tmp_path / "export"
    run_export(create_model("world-tiny", seed=0), export, check_count=4)
    repo = build_repository(export, tmp_path / "repo", "fused")
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "ttd", "serve", str(repo), "--http-port", str(port),
                                "--metrics-port", str(metrics_port)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = wait_for_line(process, "serving", 120)
        assert f"metrics http://127.0.0.1:{metrics_port}/metrics" in line, line
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        image = (WORLD / "images" / "010000.png").read_bytes()
        good = 5
        for _ in range(good):
            assert tagger_request(http, client, image, "a orange heart")["tags"] == ["orange", "heart"]
        # refused by the front: 2 unknown endpoints, 1 multipart body, 1 invalid JSON
        assert post(port, "/v2/repository/index", b"{}") == 404
        assert post(port, "/v2/repository/models/ttd_tagger/load", b"{}") == 404
        assert post(port, "/v2/models/ttd_tagger/infer", b"--x--", "multipart/form-data; boundary=x") == 415
        assert post(port, "/v2/models/ttd_tagger/infer", b"{not json") == 400
        # passed on, refused by the model: a bad image
        assert post(port, "/v2/models/ttd_tagger/infer", infer_body(b"junk", "a red circle")) == 400
        metrics = scrape(metrics_port)
        assert metrics[("ttd_front_requests_total", (("code", "200"), ("model", "ttd_tagger")))] == good
        assert metrics[("ttd_front_requests_total", (("code", "400"), ("model", "ttd_tagger")))] == 2
        assert metrics[("ttd_front_requests_total", (("code", "404"), ("model", "")))] == 2
        assert metrics[("ttd_front_refusals_total", (("reason", "not_found"),))] == 2
        assert metrics[("ttd_front_refusals_total", (("reason", "unsupported_type"),))] == 1
        assert metrics[("ttd_front_refusals_total", (("reason", "malformed"),))] == 1
        assert metrics[("ttd_front_request_duration_seconds_count", (("model", "ttd_tagger"),))] == good + 3
        assert metrics[("ttd_tritonserver_restarts_total", ())] == 0
        assert metrics[("ttd_tritonserver_metrics_up", ())] == 1
        triton = {labels: value for (name, labels), value in metrics.items() if name == "nv_inference_request_success_total"}
        # tritonserver 2.51 counts a Python-backend model's error answer (the bad image) as an executed
        # request, not a failure: the front's status-code label is what tells them apart
        assert triton[(("model", "ttd_tagger"), ("version", "1"))] == good + 1
        failures = {labels: v for (name, labels), v in metrics.items() if name == "nv_inference_request_failure_total"}
        assert sum(v for labels, v in failures.items() if ("model", "ttd_tagger") in labels) == 0
        # tritonserver killed: restarted, and the restart counted
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        servers = [int(c) for c in children if "tritonserver" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(servers) == 1
        os.kill(servers[0], signal.SIGKILL)
        wait_for_line(process, "restarted tritonserver", 120)
        assert tagger_request(http, client, image, "a orange heart")["tags"] == ["orange", "heart"]
        assert scrape(metrics_port)[("ttd_tritonserver_restarts_total", ())] == 1
        outward = _outward_address()
        if outward is not None:  # loopback only
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://{outward}:{metrics_port}/metrics", timeout=2)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0


def _outward_address() -> str | None:
    """An address of this machine that is not loopback (None where it has none)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outward interface
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address
