"""The front's connection-level refusals on the metrics port (docs/serving.md, "Metrics"):
connections refused at the cap or at the per-address cap, an idle one closed at the cap for a
new one, a request header that timed out, malformed HTTP — each counted by reason in
ttd_front_connection_refusals_total, read back with prometheus_client's text parser. The front
runs in-process before a stand-in backend (no tritonserver needed)."""

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ports import free_port

from ttd.serve.http_front import FrontLimits, start_front

parser = pytest.importorskip("prometheus_client.parser")
from ttd.serve.metrics import CONNECTION_REASONS, FrontMetrics, start_metrics  # noqa: E402

pytestmark = pytest.mark.deadline(120)
INFER = "/v2/models/ttd_tagger/infer"


class StandIn(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"name": "ttd_tagger", "max_batch_size": 4, "input": []}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def connection_counts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {s.labels["reason"]: s.value for family in parser.text_string_to_metric_families(text)
            for s in family.samples if s.name == "ttd_front_connection_refusals_total"}


def connect(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return s


def in_request(port: int, source: str) -> socket.socket:
    """A connection inside a request: its body is still coming."""
    s = connect(port, source)
    s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
    return s


def closed_within(s: socket.socket, seconds: float) -> bytes | None:
    """What the front sent before closing `s` within `seconds` (None: still open)."""
    s.settimeout(seconds)
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return answer


def status(answer: bytes | None) -> int | None:
    """The HTTP status of an answer (aiohttp answers a request line it cannot parse as HTTP/1.0)."""
    return int(answer.split(b" ", 2)[1]) if answer and answer.startswith(b"HTTP/1.") else None


def test_connection_refusals_are_counted_by_reason():
    backend = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    metrics = FrontMetrics()
    limits = FrontLimits(max_connections=4, max_per_client=2, idle_timeout_s=2.0, body_timeout_s=60)
    front = start_front("127.0.0.1", free_port(), f"127.0.0.1:{backend.server_address[1]}", limits, lambda line: None,
                        metrics)
    metrics_port = free_port()
    site = start_metrics(front.loop, "127.0.0.1", metrics_port, metrics, None)
    port = int(front.url.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        assert connection_counts(metrics_port) == {reason: 0.0 for reason in CONNECTION_REASONS}

        for _ in range(2):  # malformed HTTP: answered 400 in JSON and counted
            s = connect(port, "127.0.0.1")
            s.sendall(b"GARBAGE\r\n\r\n")
            assert status(closed_within(s, 5)) == 400
            s.close()

        s = connect(port, "127.0.0.1")  # a header that never ends: cut off after idle_timeout_s
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHo")
        assert closed_within(s, 6) is not None
        s.close()

        held += [in_request(port, "127.0.0.1"), in_request(port, "127.0.0.1")]
        time.sleep(0.3)
        third = connect(port, "127.0.0.1")  # a third from one address, its two both busy: refused
        assert status(closed_within(third, 5)) == 503
        third.close()

        held.append(in_request(port, "127.0.0.2"))
        idle = connect(port, "127.0.0.2")  # the fourth, idle: closed for a new one once older than 1 s
        time.sleep(1.3)
        newcomer = connect(port, "127.0.0.3")
        assert closed_within(idle, 5) is not None
        held.append(newcomer)
        time.sleep(0.3)
        newcomer.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
        time.sleep(0.3)
        refused = connect(port, "127.0.0.4")  # four open, all in requests: refused at the cap
        assert status(closed_within(refused, 5)) == 503
        refused.close()

        assert connection_counts(metrics_port) == {"connection_cap": 1.0, "per_client_cap": 1.0, "evicted_idle": 1.0,
                                                   "header_timeout": 1.0, "write_stalled": 0.0, "malformed_http": 2.0}
    finally:
        for s in held:
            s.close()
        site.stop()
        front.stop()
        backend.shutdown()
