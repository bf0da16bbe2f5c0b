"""Coalescing through a real tritonserver (docs/serving.md, "Coalescing"): one-image requests
that the front sends on together get, byte for byte, the answer tritonserver gives each alone;
a bad image among them still gets its own refusal; the fused tagger answers a several-image
request with its rows padded."""

import http.client
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from ports import free_port

from export.triton import build_repository

tritonclient_http = pytest.importorskip("tritonclient.http")
WORLD = Path(__file__).resolve().parents[2] / "examples" / "world"


def request_body(images: list[bytes], captions: list[str] | None = None, tags: list[str] | None = None,
                 masks: bool = False) -> tuple[bytes, int]:
    """What tritonclient sends (binary tensors, binary outputs) for these images."""
    arrays = [("image", np.array([[i] for i in images], dtype=np.object_), "BYTES")]
    if captions is not None:
        arrays.append(("caption", np.array([[c.encode()] for c in captions], dtype=np.object_), "BYTES"))
    if tags is not None:
        arrays.append(("tags", np.array([[t.encode() for t in tags]], dtype=np.object_), "BYTES"))
    if masks:
        arrays.append(("return_masks", np.array([[True]]), "BOOL"))
    inputs = []
    for name, array, kind in arrays:
        tensor = tritonclient_http.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return tritonclient_http.InferenceServerClient.generate_request_body(inputs)


def post(address: str, body: bytes, header_length: int) -> tuple[int, str | None, bytes]:
    """(status, Inference-Header-Content-Length, body) of one inference request."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", "/v2/models/ttd_tagger/infer", body,
                           {"Inference-Header-Content-Length": str(header_length),
                            "Content-Type": "application/octet-stream"})
        answer = connection.getresponse()
        return answer.status, answer.getheader("Inference-Header-Content-Length"), answer.read()
    finally:
        connection.close()


@pytest.mark.deadline(300)
def test_coalesced_requests_get_what_tritonserver_answers_each_alone(export_dir, tmp_path, monkeypatch):
    from ttd.serve.http_front import FrontLimits, start_front
    from ttd.serve.metrics import FrontMetrics
    from ttd.serve.triton_server import start_server

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    records = [json.loads(line) for line in (WORLD / "annotations.jsonl").read_text().splitlines()]
    images = [(WORLD / r["image"]).read_bytes() for r in records]
    requests = [request_body([image], [r["caption"]]) for image, r in zip(images, records)]
    requests += [request_body([b"not an image"], ["a red circle"]),  # refused alone and among others
                 request_body([images[0]], tags=["red", "circle", "sky"]),  # a tag list: a coalescing key of its own
                 request_body([images[1]], tags=["blue", "square", "grass"]),
                 request_body([images[2]], [records[2]["caption"]], masks=True)]  # masks: never coalesced
    repo = build_repository(export_dir, tmp_path / "repo", "fused")
    assert '"multi_image_requests" value: { string_value: "true" }' in (repo / "ttd_tagger" / "config.pbtxt").read_text()
    metrics = FrontMetrics()
    with start_server(repo, http_port=free_port(), grpc_port=None, timeout_s=120) as server:
        alone = [post(server.http_url, *r) for r in requests]
        assert [a[0] for a in alone] == [200] * 8 + [400, 200, 200, 200]
        # the fused tagger's answer to several images: rows padded to the longest tag list
        status, length, body = post(server.http_url, *request_body(images[:3], [r["caption"] for r in records[:3]]))
        assert status == 200
        merged = tritonclient_http.InferenceServerClient.parse_response_body(body, header_length=int(length))
        widths = [len(tritonclient_http.InferenceServerClient.parse_response_body(a[2], header_length=int(a[1]))
                      .as_numpy("tags")[0]) for a in alone[:3]]
        assert len(set(widths)) > 1  # the rows are padded
        padding = merged.as_numpy("tags") == b""
        assert not merged.as_numpy("selected")[padding].any() and not merged.as_numpy("scores")[padding].any()
        assert merged.as_numpy("tags").shape == (3, max(widths))
        assert [sum(t != b"" for t in row) for row in merged.as_numpy("tags")] == widths

        front = start_front("127.0.0.1", free_port(), server.http_url, FrontLimits(coalesce_in_flight=1),
                            lambda line: None, metrics)
        try:
            good = [k for k, a in enumerate(alone) if a[0] == 200]
            got = at_once(front.url, requests, 3 * good)
            assert [k for k, answer in got if answer != alone[k]] == []
            count, images_sent = sent_images(metrics)
            # every good request but the masks one went through the coalescer, some several to a request
            assert images_sent == 3 * (len(good) - 1) and count < images_sent
            # a bad image among them: its group is sent again image by image, each client gets its own answer
            got = at_once(front.url, requests, 3 * list(range(len(requests))))
            assert [k for k, answer in got if answer != alone[k]] == []
            assert sent_images(metrics)[1] > images_sent + 3 * (len(requests) - 1)
        finally:
            front.stop()


def at_once(url: str, requests: list, which: list[int]) -> list[tuple[int, tuple]]:
    """(k, answer) of requests[k] for every k in `which`, all sent at the same moment."""
    got: list[tuple[int, tuple]] = []
    start = threading.Barrier(len(which))

    def client(k: int) -> None:
        start.wait()
        got.append((k, post(url, *requests[k])))

    threads = [threading.Thread(target=client, args=(k,)) for k in which]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == len(which)
    return got


def sent_images(metrics) -> tuple[float, float]:
    """(requests, images) the front's coalescer sent to tritonserver so far."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for family in text_string_to_metric_families(metrics.render().decode())
              for s in family.samples if s.labels.get("model") == "ttd_tagger"}
    return values["ttd_front_coalesced_request_images_count"], values["ttd_front_coalesced_request_images_sum"]
