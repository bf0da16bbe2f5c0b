"""A client for the served `ttd_tagger` model, and a bounded load test against it: N concurrent
clients, a fixed number of requests, every answer checked against an expected result."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ttd.model.contract import TAGGER_MODEL


def tagger_request(client_module, client, image: bytes, caption: str | None = None, tags: list[str] | None = None,
                   return_masks: bool = False) -> dict:
    """One ttd_tagger call; returns {"tags", "scores", "selected"(, "masks")} or raises the server's error."""
    inputs = [_input(client_module, "image", np.array([[image]], dtype=np.object_), "BYTES")]
    if caption is not None:
        inputs.append(_input(client_module, "caption", np.array([[caption.encode()]], dtype=np.object_), "BYTES"))
    if tags is not None:
        inputs.append(_input(client_module, "tags", np.array([[t.encode() for t in tags]], dtype=np.object_), "BYTES"))
    if return_masks:
        inputs.append(_input(client_module, "return_masks", np.array([[True]]), "BOOL"))
    result = client.infer(TAGGER_MODEL, inputs)
    out = {"tags": [t.decode() for t in result.as_numpy("tags")[0]], "scores": result.as_numpy("scores")[0],
           "selected": result.as_numpy("selected")[0].astype(bool)}
    if return_masks:
        out["masks"] = result.as_numpy("masks")[0]
    return out


def tagger_batch_request(client_module, client, images: list[bytes], captions: list[str]) -> list[dict]:
    """One ttd_tagger call carrying the images (a batch axis of N, as Triton clients batch; one image
    is the one-image request `tagger_request` sends); returns each image's {"tags", "scores",
    "selected"}: its row up to the answer's padding (ttd/serve/tagger_requests.py stacked_answer)."""
    result = client.infer(TAGGER_MODEL, [
        _input(client_module, "image", np.array([[image] for image in images], dtype=np.object_), "BYTES"),
        _input(client_module, "caption", np.array([[c.encode()] for c in captions], dtype=np.object_), "BYTES")])
    tags, scores, selected = (result.as_numpy(name) for name in ("tags", "scores", "selected"))
    answers = []
    for k in range(len(images)):
        row = [t.decode() for t in tags[k]]
        n = row.index("") if "" in row else len(row)
        answers.append({"tags": row[:n], "scores": scores[k][:n], "selected": selected[k][:n].astype(bool)})
    return answers


def _input(client_module, name: str, array: np.ndarray, dtype: str):
    tensor = client_module.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass
class LoadReport:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        lat = np.array(self.latencies_s) * 1000 if self.latencies_s else np.zeros(1)
        return {"requests": self.requests, "errors": len(self.errors), "mismatches": len(self.mismatches),
                "throughput_rps": self.requests / max(self.seconds, 1e-9), "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99))}


def run_clients(url: str, clients: int, total: int, call: Callable[[object, int], None]) -> float:
    """Seconds for `clients` threads, each with its own HTTP client, to make `call(client, index)`
    for every index in range(total), sharing the indices between them."""
    import tritonclient.http as http

    lock, counter = threading.Lock(), iter(range(total))

    def worker() -> None:
        client = http.InferenceServerClient(url, network_timeout=120)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            call(client, index)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def load_test(url: str, pairs: list[tuple[bytes, str]], expected: list[dict], clients: int, total: int,
              atol: float = 1e-5) -> LoadReport:
    """`clients` threads share `total` requests over `pairs`; each answer must equal `expected`
    (same tags and selection, scores within `atol`)."""
    import tritonclient.http as http

    report = LoadReport()
    lock = threading.Lock()

    def request(client, index: int) -> None:
        image, caption = pairs[index % len(pairs)]
        want = expected[index % len(pairs)]
        start = time.perf_counter()
        try:
            got = tagger_request(http, client, image, caption)
        except Exception as error:
            with lock:
                report.errors.append(f"request {index}: {error}")
            return
        elapsed = time.perf_counter() - start
        same = got["tags"] == want["tags"] and np.array_equal(got["selected"], want["selected"]) and \
            np.allclose(got["scores"], want["scores"], atol=atol)
        with lock:
            report.requests += 1
            report.latencies_s.append(elapsed)
            if not same:
                report.mismatches.append(f"request {index}: {got} != {want}")

    report.seconds = run_clients(url, clients, total, request)
    return report
