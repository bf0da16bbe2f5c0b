"""The HTTP front that `ttd serve` puts on the public port, with tritonserver on loopback behind it.

tritonserver 2.51 answers a malformed body from its own HTTP layer with HTTP 500 (invalid JSON,
an `inputs` that is not a list, a shape that is not a list of unsigned integers) and was seen to
die (SIGSEGV) on a large form-encoded body, which it parses on its HTTP threads' stack. The front
(aiohttp) makes sure no such request reaches it: it bounds the body before reading it, accepts
only JSON or Triton's binary-tensor framing (`Inference-Header-Content-Length`), checks the
inference request's shape, exposes only the read and inference endpoints, and answers every
refusal 4xx with a JSON `{"error": reason}`. Good requests are forwarded over kept-alive
connections and the answer is streamed back. A request whose backend connection breaks (the
server died and `ttd serve` restarts it) waits for the backend to be ready and is sent once more.

Request bodies are read whole (bounded) before forwarding: the checks and the one retry need
them. gRPC does not pass through the front (see `ttd serve --help`).

Connections are bounded too: a connection must send a complete request
header within `idle_timeout_s` of opening (or of its previous answer: aiohttp's keep-alive timer,
which data does not reset) and its body within `body_timeout_s`; at most `max_connections` are
open at once (kept below the file-descriptor limit, so accept() never fails for lack of one), and
one more is answered 503 and closed. Malformed HTTP gets the same JSON refusal as everything else,
and every such event is one log line, rate-limited (RateLimitedLog).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import zlib
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import quote
from dataclasses import dataclass

from aiohttp import ClientConnectionError, ClientSession, ClientTimeout, TCPConnector, web

from ttd.errors import InputError, TTDError
from ttd.serve.backend_client import BackendGone, BackendPool
from ttd.serve.coalescing import one_image
from ttd.serve.front_coalescer import Coalescer
from ttd.serve.front_connections import Connections, FrontConnection, RateLimitedLog, connection_cap


@dataclass(frozen=True)
class FrontLimits:
    """What the front lets through. The default body bound leaves room for the tagger's own 20 MiB
    image limit (so an oversized image still gets the model's precise reason)."""

    max_body_bytes: int = 64 << 20
    retry_wait_s: float = 30.0  # how long a request waits for a restarting backend
    backend_timeout_s: float = 600.0  # a backend that stops answering mid-request
    stream_above_bytes: int = 1 << 20  # answers larger than this are streamed, smaller ones copied
    idle_timeout_s: float = 15.0  # connection open (or last answer) -> complete request header
    body_timeout_s: float = 60.0  # request header -> complete body (64 MiB at 9 Mbit/s)
    max_connections: int = 1024  # lowered to fit the file-descriptor limit (connection_cap)
    max_per_client: int = 0  # connections one address may hold; 0: half of max_connections
    write_timeout_s: float = 30.0  # an answer the client reads none of for this long: the connection is closed
    log_interval_s: float = 10.0  # at most one log line per kind of event in this long
    # coalescing (docs/serving.md, "Coalescing"): requests at tritonserver at once per inference path
    # of a model that takes several images a request (0, the default: every request forwarded as it
    # came; coalescing did not lower the CPU cost on a CPU instance), and the tensor bytes of one
    # coalesced request
    coalesce_in_flight: int = 0
    coalesce_max_bytes: int = 16 << 20


class Refusal(Exception):
    """A request the front answers itself, with an HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def refusal_response(refusal: Refusal) -> web.Response:
    return web.json_response({"error": refusal.reason}, status=refusal.status)


# Endpoints a client of `ttd serve` needs: health, server and model metadata, config, statistics,
# inference. Everything else (shared-memory registration, logging and trace settings, model
# load/unload) is refused: those are operator actions, not for whoever can reach the port.
READ_PATHS = re.compile(r"^/v2(/health/(live|ready)|/models(/[^/]+(/versions/[^/]+)?(/ready|/config|/stats)?|/stats)?)?/?$")
INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(/versions/[^/]+)?/infer$")
# Bodies may come with curl's and urllib's default form type (Triton's own examples POST with
# `curl -d`); they are checked as JSON (or binary framing) and passed on as application/json (or
# application/octet-stream), so a form type never reaches tritonserver's form parser. multipart
# and any other type are refused.
ACCEPTED_TYPES = {"", "application/json", "application/octet-stream", "application/x-www-form-urlencoded", "text/plain"}
DECOMPRESSORS = {"gzip": 31, "deflate": 15}  # zlib window bits: gzip wrapper, zlib wrapper (what Triton's deflate means)


def check_route(method: str, path: str) -> None:
    if method in ("GET", "HEAD") and READ_PATHS.match(path):
        return
    if method == "POST" and INFER_PATH.match(path):
        return
    if READ_PATHS.match(path) or INFER_PATH.match(path):
        raise Refusal(405, f"{method} is not allowed on {path}")
    raise Refusal(404, f"{path} is not served here: ttd serve exposes /v2, /v2/health/*, /v2/models/... and "
                       "POST /v2/models/<model>/infer")


def check_headers(content_type: str, header_length: str | None, content_encoding: str, declared: int | None,
                  limits: FrontLimits) -> int | None:
    """Refuse on the headers alone, before reading a byte of the body; returns the JSON header's
    length of a binary-framed request (None for a plain JSON one)."""
    if declared is not None and declared > limits.max_body_bytes:
        raise Refusal(413, f"body of {declared:,} bytes exceeds the limit of {limits.max_body_bytes:,}")
    if content_encoding not in ("", "identity", *DECOMPRESSORS):
        raise Refusal(415, f"Content-Encoding {content_encoding!r} is not accepted (use gzip, deflate or none)")
    if content_type not in ACCEPTED_TYPES:
        raise Refusal(415, f"Content-Type {content_type!r} is not accepted: send JSON (application/json), or "
                           "binary tensors (application/octet-stream) with an Inference-Header-Content-Length header")
    if header_length is None:
        return None
    if not header_length.isdigit() or int(header_length) == 0:
        raise Refusal(400, f"Inference-Header-Content-Length {header_length!r} is not a positive integer")
    return int(header_length)


async def read_body(request: web.BaseRequest, limits: FrontLimits) -> bytes:
    """The body, read in chunks and refused as soon as it passes the bound (a body without a
    declared length, i.e. chunked, is never buffered past it) or takes longer than
    `body_timeout_s` (a client trickling its body does not hold a connection for ever)."""
    if request.content.is_eof():  # the whole body came with the header (most requests): no waiting
        body = request.content.read_nowait()
        if len(body) > limits.max_body_bytes:
            raise Refusal(413, f"body exceeds the limit of {limits.max_body_bytes:,} bytes")
        return body
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout_s
    while True:
        try:
            chunk = await asyncio.wait_for(request.content.readany(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError as error:
            raise Refusal(408, f"body not complete after {limits.body_timeout_s:g} s ({size:,} bytes received)") from error
        if not chunk:
            break
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise Refusal(413, f"body exceeds the limit of {limits.max_body_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decompress(body: bytes, encoding: str, limits: FrontLimits) -> bytes:
    """A gzip or deflate body inflated under the same bound (a small bomb cannot grow past it)."""
    inflater = zlib.decompressobj(DECOMPRESSORS[encoding])
    try:
        plain = inflater.decompress(body, limits.max_body_bytes + 1)
    except zlib.error as error:
        raise Refusal(400, f"body is not valid {encoding} data: {error}") from error
    if len(plain) > limits.max_body_bytes or inflater.unconsumed_tail:
        raise Refusal(413, f"decompressed body exceeds the limit of {limits.max_body_bytes:,} bytes")
    if not inflater.eof:
        raise Refusal(400, f"body is truncated {encoding} data")
    return plain


def _reject_constant(name: str) -> None:
    raise InputError(f"{name} is not a JSON number")


def parse_json(text: bytes, what: str) -> object:
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise Refusal(400, f"{what} is not UTF-8: {error}") from error
    except RecursionError as error:
        raise Refusal(400, f"{what} is nested too deeply") from error
    except ValueError as error:
        raise Refusal(400, f"{what} is not valid JSON: {error}") from error


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def infer_request_problem(request: object, binary_bytes: int | None) -> str | None:
    """What makes a parsed inference request one tritonserver's HTTP layer would answer with 500
    (or misread), or None. `binary_bytes` is the size of the tensor data after the JSON header of a
    binary-framed request, which the inputs' `binary_data_size` must add up to."""
    if not isinstance(request, dict):
        return "the inference request must be a JSON object"
    inputs = request.get("inputs")
    if not isinstance(inputs, list):
        return "'inputs' must be a list of input tensors"
    declared_binary = 0
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            return f"{where} must be an object"
        if not isinstance(tensor.get("name"), str):
            return f"{where}: 'name' must be a string"
        where = f"input {tensor['name']!r}"
        if not isinstance(tensor.get("datatype"), str):
            return f"{where}: 'datatype' must be a string"
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            return f"{where}: 'shape' must be a list of non-negative integers"
        parameters = tensor.get("parameters", {})
        if not isinstance(parameters, dict):
            return f"{where}: 'parameters' must be an object"
        if "binary_data_size" in parameters:
            if not _is_count(parameters["binary_data_size"]):
                return f"{where}: 'binary_data_size' must be a non-negative integer"
            declared_binary += parameters["binary_data_size"]
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        return "'outputs' must be a list of objects with a 'name'"
    if not isinstance(request.get("parameters", {}), dict):
        return "'parameters' must be an object"
    if binary_bytes is None and declared_binary:
        return "inputs declare binary_data_size but the request has no Inference-Header-Content-Length header"
    if binary_bytes is not None and declared_binary != binary_bytes:
        return (f"the inputs' binary_data_size add up to {declared_binary:,} bytes but {binary_bytes:,} bytes of "
                "tensor data follow the JSON header")
    return None


def check_infer_body(body: bytes, header_length: int | None) -> dict:
    """A whole inference body: JSON (or a JSON header and tensor data whose sizes agree); returns
    the parsed request (the header of a binary-framed one)."""
    if not body:
        raise Refusal(400, "empty body: an inference request is a JSON object")
    if header_length is not None and header_length > len(body):
        raise Refusal(400, f"Inference-Header-Content-Length is {header_length:,} but the body has only "
                           f"{len(body):,} bytes")
    header = body if header_length is None else body[:header_length]
    request = parse_json(header, "the inference request" if header_length is None else "the inference header")
    problem = infer_request_problem(request, None if header_length is None else len(body) - header_length)
    if problem:
        raise Refusal(400, problem)
    return request


@dataclass(frozen=True)
class ModelShapes:
    """What a model's config allows: the batch bound and, per input, its dims (-1: variable) and the
    bound of a variable dimension: the `max_variable_dim` parameter of the ttd graph models, or the
    `max_tags` parameter of ttd_tagger, whose one variable input is the tag list."""

    max_batch_size: int
    dims: dict[str, list[int]]
    max_variable_dim: int | None
    multi_image: bool = False  # the model's `multi_image_requests` parameter: it may be sent coalesced requests

    @classmethod
    def from_config(cls, config: dict) -> ModelShapes:
        parameters = config.get("parameters", {})
        bounds = [parameters.get(key, {}).get("string_value") for key in ("max_variable_dim", "max_tags")]
        bound = next((int(b) for b in bounds if b), None)
        return cls(int(config.get("max_batch_size", 0)),
                   {i["name"]: [int(d) for d in i.get("dims", [])] for i in config.get("input", [])},
                   bound, parameters.get("multi_image_requests", {}).get("string_value") == "true")

    def largest_dim(self) -> int | None:
        """The largest size any dimension of any input may have (None: a variable one is unbounded)."""
        dims = [d for shape in self.dims.values() for d in shape]
        if -1 in dims and self.max_variable_dim is None:
            return None
        return max([self.max_batch_size, self.max_variable_dim or 0, *dims])


SHAPE_IN_JSON = re.compile(rb'"shape"\s*:\s*\[([0-9,\s]{0,200})\]')
PRE_CHECK_ABOVE_BYTES = 64 << 10


def declared_shape_problem(body: bytes, shapes: ModelShapes) -> str | None:
    """A large JSON body is refused from the shapes it declares before it is parsed: 32 MB of
    4,000,000 tags is about 1 GB of Python objects once parsed. A quote inside a JSON string is
    escaped, so `"shape": [...]` is found only where the request declares a shape."""
    largest = shapes.largest_dim()
    if largest is None:
        return None
    for match in SHAPE_IN_JSON.finditer(body):
        dims = [int(d) for d in match.group(1).split(b",") if d.strip()]
        if dims and max(dims) > largest:
            return (f"a tensor of shape {dims} has a dimension of {max(dims):,}, more than this model accepts in "
                    f"any dimension ({largest:,}: its max_batch_size, input dims and variable-dimension limit)")
    return None


def shape_problem(request: dict, shapes: ModelShapes) -> str | None:
    """A batch or a variable dimension past the model's bounds, seen in the request's header: the
    tensor is refused here instead of being copied into tritonserver and the model's stub (a 60 MB
    tag list refused by the model itself left the service about 130 MiB larger for good)."""
    for tensor in request["inputs"]:
        dims, shape = shapes.dims.get(tensor["name"]), tensor["shape"]
        if dims is None or len(shape) != len(dims) + bool(shapes.max_batch_size):
            continue  # unknown input or wrong rank: tritonserver's own 400 says so
        if shapes.max_batch_size and shape[0] > shapes.max_batch_size:
            return (f"input {tensor['name']!r}: batch of {shape[0]:,} is more than the model's max_batch_size "
                    f"{shapes.max_batch_size}")
        offset = 1 if shapes.max_batch_size else 0
        for k, (size, dim) in enumerate(zip(shape[offset:], dims)):
            if dim == -1 and shapes.max_variable_dim is not None and size > shapes.max_variable_dim:
                return (f"input {tensor['name']!r}: dimension {k + offset} is {size}, more than the limit of "
                        f"{shapes.max_variable_dim}")
    return None


# Headers passed on each way; hop-by-hop ones (Connection, Transfer-Encoding, ...) never are.
# The client's Content-Type is replaced by what the front checked the body to be.
REQUEST_HEADERS = ("Inference-Header-Content-Length", "Accept", "Accept-Encoding")
RESPONSE_HEADERS = ("Content-Type", "Inference-Header-Content-Length", "Content-Encoding")
BACKEND: web.AppKey = web.AppKey("backend", object)
COALESCER: web.AppKey = web.AppKey("coalescer", object)  # a Coalescer (ttd/serve/front_coalescer.py), or None
METRICS: web.AppKey = web.AppKey("metrics", object)  # a FrontMetrics (ttd/serve/metrics.py), or None


class Backend:
    """The connections to tritonserver: requests are forwarded on `pool` (ttd/serve/backend_client.py);
    the model configs the front reads once come through an aiohttp session. After a broken
    connection (the server died) the pool's idle connections are closed, so a retry never goes out
    on another of the dead server's connections."""

    def __init__(self, url: str, limits: FrontLimits, say: Callable[[str], None]) -> None:
        self.url, self.limits, self.say = url, limits, say
        host, port = url.rsplit(":", 1)
        self.pool = BackendPool(host, int(port), 5.0, limits.backend_timeout_s)
        self.session: ClientSession | None = None
        self.shapes: dict[str, ModelShapes | None] = {}  # per model, read once from its config

    async def model_shapes(self, model: str) -> ModelShapes | None:
        """The model's bounds from tritonserver's config endpoint (None: unknown model, or the
        server cannot say now; the request then goes on and tritonserver answers it)."""
        if model not in self.shapes:
            try:
                async with self.open().get(f"/v2/models/{quote(model, safe='')}/config") as answer:
                    if answer.status != 200:
                        return None
                    self.shapes[model] = ModelShapes.from_config(await answer.json(content_type=None))
            except (ClientConnectionError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
                return None
        return self.shapes[model]

    def open(self) -> ClientSession:
        if self.session is None or self.session.closed:
            self.session = ClientSession(
                f"http://{self.url}", connector=TCPConnector(limit=0, keepalive_timeout=30), auto_decompress=False,
                timeout=ClientTimeout(total=None, sock_connect=5, sock_read=self.limits.backend_timeout_s))
        return self.session

    async def ready(self) -> bool:
        try:
            async with ClientSession(f"http://{self.url}", timeout=ClientTimeout(total=2)) as probe:
                async with probe.get("/v2/health/ready") as answer:
                    return answer.status == 200
        except (ClientConnectionError, asyncio.TimeoutError):
            return False

    async def wait_ready(self) -> bool:
        deadline = asyncio.get_running_loop().time() + self.limits.retry_wait_s
        while asyncio.get_running_loop().time() < deadline:
            if await self.ready():
                return True
            await asyncio.sleep(0.1)
        return False

    async def close(self) -> None:
        self.pool.reset()
        if self.session is not None:
            await self.session.close()


T = TypeVar("T")


async def retried(method: str, path: str, backend: Backend, attempt: Callable[[], Awaitable[T]],
                  begun: Callable[[], bool] = lambda: False) -> T:
    """`attempt()` (one exchange with tritonserver), once more when the backend connection broke
    before an answer was `begun` to the client: after the backend is ready again (a restart)."""
    for tries in (1, 2):
        try:
            return await attempt()
        except (BackendGone, asyncio.TimeoutError) as error:
            # a response already begun cannot be taken back: the client sees the connection drop
            if begun():
                raise
            backend.pool.reset()
            reason = f"{type(error).__name__}: {error}".rstrip(": ")
            if path.startswith("/v2/health/"):  # a probe wants the state now, not after a wait
                raise Refusal(503, f"the inference server is not reachable ({reason}); restarting?") from error
            if tries == 2:
                raise Refusal(502, f"the inference server failed this request twice ({reason})") from error
            backend.say(f"front: backend connection lost during {method} {path} ({reason}); "
                        "retrying once when it is ready")
            if not await backend.wait_ready():
                raise Refusal(503, f"the inference server is not ready after {backend.limits.retry_wait_s:.0f} s "
                                   "(restarting?); retry later") from error
    raise AssertionError("unreachable")


def passed_on(headers: dict[str, str]) -> dict[str, str]:
    """The answer's headers the client gets (tritonserver's, lower-case, by their usual names)."""
    return {name: headers[name.lower()] for name in RESPONSE_HEADERS if name.lower() in headers}


async def exchange(backend: Backend, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    """POST `body` to `path` and read the answer whole (the coalescer's small answers), retried
    as every forwarded request."""
    async def attempt() -> tuple[int, dict[str, str], bytes]:
        answer = await backend.pool.send("POST", path, headers, body)
        try:
            return answer.status, passed_on(answer.headers), await answer.read()
        finally:
            answer.release()

    return await retried("POST", path, backend, attempt)


async def forward(request: web.BaseRequest, backend: Backend, body: bytes | None) -> web.StreamResponse:
    headers = {name: request.headers[name] for name in REQUEST_HEADERS if name in request.headers}
    if body is not None:
        binary = "Inference-Header-Content-Length" in headers
        headers["Content-Type"] = "application/octet-stream" if binary else "application/json"
    path = request.rel_url.raw_path_qs
    response: web.StreamResponse | None = None

    async def attempt() -> web.StreamResponse:
        nonlocal response
        answer = await backend.pool.send(request.method, path, headers, body)
        try:
            out_headers = passed_on(answer.headers)
            if answer.length is not None and answer.length <= backend.limits.stream_above_bytes:
                return web.Response(status=answer.status, body=await answer.read(), headers=out_headers)
            response = web.StreamResponse(status=answer.status, headers=out_headers)
            if answer.length is not None:
                response.content_length = answer.length
            await response.prepare(request)
            async for chunk in answer.chunks():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            answer.release()

    return await retried(request.method, request.path, backend, attempt,
                         lambda: response is not None and response.prepared)


async def refuse(request: web.BaseRequest, refusal: Refusal) -> web.Response:
    """The JSON refusal. After a 413 the connection is not kept alive: aiohttp writes the answer,
    then reads and discards what the client is still sending for at most its lingering time
    (10 s; never buffered), so a client that sends the whole body before reading still gets the
    413 rather than a reset connection."""
    response = refusal_response(refusal)
    if request.app.get(METRICS) is not None:
        request.app[METRICS].refused(refusal.status)
    if refusal.status == 413:
        response.force_close()
    return response


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    """A request, marked on its connection as under way (a connection in a request is never closed
    to make room for another: ttd/serve/front_connections.py)."""
    connection = request.protocol
    if isinstance(connection, FrontConnection):
        connection.busy += 1
        connection.partial = False
    metrics, status = request.app.get(METRICS), 500
    started = asyncio.get_running_loop().time()
    try:
        response = await _handle(request)
        status = response.status
        return response
    finally:
        if isinstance(connection, FrontConnection):
            connection.busy -= 1
        if metrics is not None:  # counted per answer (docs/serving.md, "Metrics")
            infer = INFER_PATH.match(request.path) if request.method == "POST" else None
            metrics.answered(infer["model"] if infer else "", status,
                             asyncio.get_running_loop().time() - started if infer else None)


async def _handle(request: web.BaseRequest) -> web.StreamResponse:
    backend: Backend = request.app[BACKEND]
    limits = backend.limits
    try:
        check_route(request.method, request.path)
        if request.method != "POST":
            return await forward(request, backend, None)
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        header_length = check_headers(request.content_type if "Content-Type" in request.headers else "",
                                      request.headers.get("Inference-Header-Content-Length"), encoding,
                                      request.content_length, limits)
        body = await read_body(request, limits)
        if encoding in DECOMPRESSORS:
            body = decompress(body, encoding, limits)
        shapes = await backend.model_shapes(INFER_PATH.match(request.path)["model"])
        if (shapes is not None and header_length is None and len(body) > PRE_CHECK_ABOVE_BYTES
                and (problem := declared_shape_problem(body, shapes))):
            raise Refusal(400, problem)
        if len(body) > 1 << 20:  # parsing a large JSON body must not stall every other connection
            parsed = await asyncio.get_running_loop().run_in_executor(None, check_infer_body, body, header_length)
        else:
            parsed = check_infer_body(body, header_length)
        if shapes is not None and (problem := shape_problem(parsed, shapes)):
            raise Refusal(400, problem)
        coalescer = request.app[COALESCER]
        if coalescer is not None and shapes is not None and shapes.multi_image and header_length is not None:
            one = one_image(parsed, body, header_length, request.headers)
            if one is not None:
                status, headers, answer = await coalescer.submit(request.rel_url.raw_path_qs, one, body, header_length,
                                                                 shapes.max_batch_size)
                return web.Response(status=status, body=answer, headers=headers)
        return await forward(request, backend, body)
    except Refusal as refusal:
        return await refuse(request, refusal)


def create_front(backend_url: str, limits: FrontLimits, say: Callable[[str], None],
                 metrics: object | None = None) -> web.Application:
    """The front as an aiohttp application forwarding to tritonserver at `backend_url` (host:port),
    counting into `metrics` (a FrontMetrics) when given."""
    app = web.Application(client_max_size=limits.max_body_bytes)
    backend = app[BACKEND] = Backend(backend_url, limits, say)
    app[METRICS] = metrics
    app[COALESCER] = None
    if limits.coalesce_in_flight > 0:
        app[COALESCER] = Coalescer(lambda path, headers, body: exchange(backend, path, headers, body),
                                   limits.coalesce_in_flight, limits.coalesce_max_bytes,
                                   None if metrics is None else lambda path, images: metrics.sent(  # type: ignore[attr-defined]
                                       (INFER_PATH.match(path.split("?", 1)[0]) or {"model": ""})["model"], images))

    async def close_backend(app: web.Application) -> None:
        await app[BACKEND].close()

    app.on_cleanup.append(close_backend)
    app.router.add_route("*", "/{path:.*}", handle)
    return app


class FrontError(TTDError, RuntimeError):
    """The front could not start (the port is taken, the address cannot be bound)."""


@dataclass
class Front:
    """A front running on its own event loop in a background thread (the caller keeps the main
    thread for supervising tritonserver and for signals)."""

    url: str
    loop: asyncio.AbstractEventLoop
    runner: web.AppRunner
    listener: asyncio.Server | None
    thread: threading.Thread
    connections: Connections

    def stop(self, timeout_s: float = 20) -> None:
        if not self.thread.is_alive():
            return

        async def close() -> None:
            if self.listener is not None:
                self.listener.close()
            await self.runner.cleanup()
            # what is left (a connection lingering to drain a refused body) ends with the loop
            left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout_s)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout_s)


def start_front(host: str, port: int, backend_url: str, limits: FrontLimits = FrontLimits(),
                say: Callable[[str], None] = print, metrics: object | None = None) -> Front:
    """Bind host:port and serve the front there; raises FrontError when it cannot."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ttd-http-front", daemon=True)
    thread.start()
    log = RateLimitedLog(say, limits.log_interval_s)
    runner = web.AppRunner(create_front(backend_url, limits, say, metrics), access_log=None, handle_signals=False,
                           shutdown_timeout=10)  # requests in flight at a stop get this long to finish
    cap = connection_cap(limits.max_connections)
    if cap < limits.max_connections:  # said once: the operator asked for more
        say(f"front: at most {cap} connections, not {limits.max_connections}: the file-descriptor limit (ulimit -n) "
            "leaves room for no more (each may hold one to tritonserver); raise it for more")
    connections = Connections(cap, min(limits.max_per_client, cap) if limits.max_per_client else 0)
    count = metrics.connection_refused if metrics is not None else (lambda reason: None)

    def connection() -> FrontConnection:
        # keepalive_timeout: aiohttp closes a connection that has not completed a request header this
        # long after it opened or after its last answer (bytes arriving do not extend it); bodies are
        # inflated by the front itself, under its bound (auto_decompress=False: never twice)
        return FrontConnection(runner.server, connections, log, limits.write_timeout_s, count, loop=loop, access_log=None,
                               keepalive_timeout=limits.idle_timeout_s, lingering_time=10.0, auto_decompress=False)

    async def open_site() -> asyncio.Server:
        await runner.setup()
        return await loop.create_server(connection, host, port, backlog=1024, reuse_address=True)

    try:
        listener = asyncio.run_coroutine_threadsafe(open_site(), loop).result(30)
    except OSError as error:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        raise FrontError(f"cannot serve HTTP on {host}:{port}: {error.strerror or error}") from error
    return Front(f"{host}:{port}", loop, runner, listener, thread, connections)
