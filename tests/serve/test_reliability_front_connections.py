"""The HTTP front against bad clients, run in-process in front of a
stand-in backend (no tritonserver needed): compressed bodies inflated once, slow clients timed
out, connections capped below the descriptor limit, malformed HTTP answered in JSON, and one
rate-limited log line per event instead of a traceback."""

import gzip
import http.client
import json
import logging
import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ports import free_port

from ttd.serve.front_connections import RateLimitedLog, connection_cap
from ttd.serve.http_front import (FrontLimits, ModelShapes, declared_shape_problem,
                                  shape_problem, start_front)

# each test starts the HTTP front: a hang fails the test in minutes (tests/conftest.py)
pytestmark = pytest.mark.deadline(180)

TAGGER_CONFIG = {"name": "ttd_tagger", "max_batch_size": 4, "parameters": {"max_tags": {"string_value": "1024"}},
                 "input": [{"name": "image", "dims": ["1"]}, {"name": "caption", "dims": ["1"]},
                           {"name": "tags", "dims": ["-1"]}]}
BIG_ANSWER = 8 << 20


class StandIn(BaseHTTPRequestHandler):
    """tritonserver's part: the model config, an echo of each inference body, a large slow answer."""

    protocol_version = "HTTP/1.1"
    received: list[tuple[bytes, str]] = []

    def log_message(self, *args) -> None:
        pass

    def answer(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.endswith("/config"):
            return self.answer(TAGGER_CONFIG)
        if self.path.endswith("/stats"):  # large, in slow pieces: the client can leave half way
            self.send_response(200)
            self.send_header("Content-Length", str(BIG_ANSWER))
            self.end_headers()
            try:
                for _ in range(BIG_ANSWER >> 16):
                    self.wfile.write(b"x" * (1 << 16))
                    time.sleep(0.002)
            except OSError:
                pass
            return None
        return self.answer({"ready": True})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        StandIn.received.append((body, self.headers.get("Content-Encoding", "")))
        self.answer({"model_name": "ttd_tagger", "model_version": "1", "outputs": []})


@pytest.fixture(scope="module")
def backend():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def front(backend):
    started = []

    def start(**limits):
        lines: list[str] = []
        front = start_front("127.0.0.1", free_port(), backend, FrontLimits(**limits), lines.append)
        started.append(front)
        host, port = front.url.split(":")
        return host, int(port), lines

    yield start
    for front in started:
        front.stop()


def post(host, port, path, body, headers=None):
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", path, body, headers or {})
    response = connection.getresponse()
    return response.status, response.getheader("Content-Type"), response.read()


def raw(host, port, data: bytes, wait_s: float = 5) -> bytes:
    """What the front answers to `data` sent as is, until it closes the connection."""
    with socket.create_connection((host, port), timeout=wait_s) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
        return answer


INFER = "/v2/models/ttd_tagger/infer"
REQUEST = json.dumps({"inputs": [{"name": "tags", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}).encode()


@pytest.mark.parametrize("encoding, pack", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_a_compressed_request_is_inflated_once(front, encoding, pack):
    """Item 5: tritonclient's request_compression_algorithm gave 400 "not valid gzip data":
    aiohttp had inflated the body already, and the front inflated it again."""
    host, port, _ = front()
    StandIn.received.clear()
    status, kind, body = post(host, port, INFER, pack(REQUEST), {"Content-Encoding": encoding,
                                                                 "Content-Type": "application/json"})
    assert status == 200, body
    assert StandIn.received == [(REQUEST, "")]  # tritonserver gets the plain JSON


def test_tritonclient_with_request_compression(front):
    httpclient = pytest.importorskip("tritonclient.http")
    import numpy as np

    host, port, _ = front()
    client = httpclient.InferenceServerClient(f"{host}:{port}")
    tags = httpclient.InferInput("tags", [1, 2], "BYTES")
    tags.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object), binary_data=False)
    for algorithm in ("gzip", "deflate"):
        StandIn.received.clear()
        result = client.infer("ttd_tagger", [tags], request_compression_algorithm=algorithm)
        assert result.get_response()["model_name"] == "ttd_tagger"
        assert json.loads(StandIn.received[0][0])["inputs"][0]["shape"] == [1, 2]


def test_a_slow_header_or_body_is_cut_off(front):
    """Item 8: a header sent one byte a second held its connection for as long as the client
    liked (aiohttp's keep-alive default is an hour); a trickled body too."""
    host, port, lines = front(idle_timeout_s=1.0, body_timeout_s=1.0)
    with socket.create_connection((host, port), timeout=10) as s:
        started = time.monotonic()
        closed_after = None
        for byte in b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n":
            try:
                s.sendall(bytes([byte]))
                s.settimeout(0.2)
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None and closed_after < 3, closed_after
    answer = raw(host, port, f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b"{" * 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"application/json" in head
    assert json.loads(body) == {"error": "body not complete after 1 s (10 bytes received)"}


def test_slow_clients_at_the_cap_make_room_for_good_ones(front):
    """Item 8: 1,250 sockets sending a header a byte a second starved good requests. At the cap
    the longest-waiting connection without a request under way is closed for the new one."""
    host, port, lines = front(max_connections=4, max_per_client=4, idle_timeout_s=30)  # all on 127.0.0.1
    slow = [socket.create_connection((host, port)) for _ in range(4)]
    try:
        for s in slow:
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHo")  # a header that never ends
        time.sleep(1.2)  # older than MIN_AGE_S
        for _ in range(3):
            status, _, _ = post(host, port, INFER, REQUEST)
            assert status == 200
        closed = 0
        for s in slow:
            s.settimeout(1)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
        assert closed >= 1
    finally:
        for s in slow:
            s.close()
    evictions = [line for line in lines if "closed the longest idle one" in line]
    assert len(evictions) == 1 and evictions[0].startswith("front: 4 connections open (the limit): closed"), lines


def test_connections_past_the_cap_all_in_requests_get_503_and_one_log_line(front):
    """Item 8: past the cap, with every connection inside a request (here: sending its body), a
    new connection is answered 503 and closed at once, and logged once per 10 s, not a traceback."""
    host, port, lines = front(max_connections=4, max_per_client=4, body_timeout_s=30)  # all on 127.0.0.1
    held = [socket.create_connection((host, port)) for _ in range(4)]
    try:
        for s in held:
            s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
        time.sleep(1.2)
        for _ in range(20):
            answer = raw(host, port, b"")
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and json.loads(body) == {
                "error": "the server has 4 connections open, its limit, all in requests; retry later"}
        held.pop().close()
        time.sleep(0.3)
        status, _, _ = post(host, port, INFER, REQUEST)  # a good request gets the freed place
        assert status == 200
    finally:
        for s in held:
            s.close()
    refusals = [line for line in lines if "refused a connection" in line]
    assert len(refusals) == 1 and refusals[0].endswith("4 connections open (the limit), all in requests"), lines


def test_the_cap_stays_below_the_descriptor_limit():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10**9) == (soft - 64) // 2  # each client connection may open one to tritonserver
    assert connection_cap(10) == min(10, (soft - 64) // 2)


def test_rate_limited_log_says_how_many_it_left_out():
    now = [0.0]
    lines: list[str] = []
    log = RateLimitedLog(lines.append, 10, clock=lambda: now[0])
    for t in (0, 1, 2, 3, 11, 12, 30):
        now[0] = t
        log("busy", f"refused at {t}")
    log("other", "another kind")
    assert lines == ["refused at 0", "refused at 11 (and 3 more like it in the last 10 s)",
                     "refused at 30 (and 1 more like it in the last 10 s)", "another kind"]


def test_a_huge_tag_list_is_refused_by_the_front(front):
    """Item 9: 4,000,000 tags to ttd_tagger passed the front (it read max_variable_dim; the
    tagger's bound is max_tags) and cost a gigabyte; refused from the declared shape, unparsed."""
    import tracemalloc

    shapes = ModelShapes.from_config(TAGGER_CONFIG)
    assert shapes.max_variable_dim == 1024
    body = (b'{"inputs": [{"name": "tags", "shape": [1, 4000000], "datatype": "BYTES", "data": ['
            + b'"t",' * 3_999_999 + b'"t"]}]}')
    tracemalloc.start()
    problem = declared_shape_problem(body, shapes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert problem == ("a tensor of shape [1, 4000000] has a dimension of 4,000,000, more than this model accepts in any "
                       "dimension (1,024: its max_batch_size, input dims and variable-dimension limit)")
    assert peak < 1 << 20  # the 16 MB body is scanned, not parsed
    assert shape_problem({"inputs": [{"name": "tags", "shape": [1, 1025]}]}, shapes) == (
        "input 'tags': dimension 1 is 1025, more than the limit of 1024")  # a binary-framed request: its header
    assert shape_problem({"inputs": [{"name": "tags", "shape": [1, 1024]}]}, shapes) is None
    host, port, _ = front()
    StandIn.received.clear()
    started = time.monotonic()
    status, kind, answer = post(host, port, INFER, body, {"Content-Type": "application/json"})
    assert status == 400 and kind.startswith("application/json") and json.loads(answer)["error"] == problem
    assert time.monotonic() - started < 5 and StandIn.received == []


@pytest.mark.parametrize("request_bytes, reason", [
    (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
     "Transfer-Encoding can't be present with Content-Length"),
    (b"GARBAGE\r\n\r\n", "Invalid method encountered: b'GARBAGE'"),
    # HTTP/1.0 has no body without Content-Length: the JSON after the header is refused as such
    (f"POST {INFER} HTTP/1.0\r\nHost: x\r\n\r\n".encode() + REQUEST, "Data after `Connection: close`: b'{"),
])
def test_malformed_http_is_answered_in_json_and_logged_in_one_line(front, caplog, request_bytes, reason):
    """Item 19: malformed HTTP got a plain-text answer and a ten-line traceback in the log."""
    host, port, lines = front()
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        answer = raw(host, port, request_bytes)
    responses = [part for part in answer.split(b"HTTP/1.") if part]
    assert responses, answer
    errors = []
    for response in responses:
        head, _, body = response.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head and b"text/plain" not in head, answer
        errors.append(json.loads(body)["error"])
    assert errors[0].startswith(reason) and "\n" not in errors[0], errors
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.records
    assert len(lines) <= 1 and all("\n" not in line for line in lines), lines


def test_a_client_that_goes_away_is_one_line_not_a_traceback(front, caplog):
    host, port, lines = front()
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        for _ in range(3):
            with socket.create_connection((host, port)) as s:
                s.sendall(b"GET /v2/models/ttd_tagger/stats HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [r for r in caplog.records if r.exc_info] == []
    assert len(lines) == 1 and "front: client went away during GET /v2/models/ttd_tagger/stats" in lines[0], lines


def test_clients_that_never_read_their_answers_hold_no_slot(front):
    """Four clients asking for a large answer and reading none of it held every slot of
    `--max-connections 4` (busy, so never evicted; no write timeout): every other client got 503
    for 75 s. Now one address holds at most half the slots, and a stalled answer is cut off."""
    host, port, lines = front(max_connections=4, write_timeout_s=2)
    stalled = []
    for _ in range(4):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answer stalls at once
        s.connect((host, port))
        s.sendall(b"GET /v2/models/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.append(s)
    try:
        time.sleep(0.5)
        # from another address (127.0.0.2 is loopback too) a good client is served at once
        connection = http.client.HTTPConnection(host, port, timeout=10, source_address=("127.0.0.2", 0))
        connection.request("POST", INFER, REQUEST)
        assert connection.getresponse().status == 200
        started = time.monotonic()
        while not any("read none of its answer for 2 s" in line for line in lines) and time.monotonic() - started < 20:
            time.sleep(0.1)
        assert any(line.startswith("front: closed a connection from 127.0.0.1:") and line.endswith(
            "read none of its answer for 2 s") for line in lines), lines  # the stall really happened, and ended
        # the third and fourth met the per-address limit (2 of 4): refused, or an idle one of its own closed
        per_address = [line for line in lines if "2 connections open from 127.0.0.1 (the limit per address)" in line]
        assert per_address, lines
        time.sleep(0.3)
        status, _, _ = post(host, port, INFER, REQUEST)  # the stalled ones are gone: 127.0.0.1 is served again
        assert status == 200
    finally:
        for s in stalled:
            s.close()

