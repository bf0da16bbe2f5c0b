"""Prometheus metrics of `ttd serve` (docs/serving.md, "Metrics"): the front's own (requests by
model and status, refusals by reason, inference latency, images per request the coalescer sent,
tritonserver restarts) and
tritonserver's (queue and compute time, batch counts, per model), on one metrics port that binds
to loopback unless told otherwise.

tritonserver's metrics endpoint listens on a free loopback port of its own; the metrics port
answers `GET /metrics` with the front's metrics followed by what tritonserver reports there, so
one scrape target sees both. While tritonserver restarts, only the front's part is answered, and
`ttd_tritonserver_metrics_up` is 0.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from ttd.errors import RuntimeProblem

# the front's refusals by HTTP status (the reason texts vary; these labels do not)
REFUSAL_REASONS = {400: "malformed", 404: "not_found", 405: "method_not_allowed", 408: "body_timeout",
                   413: "body_too_large", 415: "unsupported_type", 502: "backend_failed", 503: "backend_unavailable"}
# connections the front refused or closed itself (ttd/serve/front_connections.py)
CONNECTION_REASONS = ("connection_cap", "per_client_cap", "evicted_idle", "header_timeout", "write_stalled",
                      "malformed_http")
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FrontMetrics:
    """The front's counters in a registry of their own (two services in one process never mix)."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as error:
            raise RuntimeProblem("metrics need prometheus_client (pip install -e '.[serve]')") from error
        self.registry = CollectorRegistry()
        self.requests = Counter("ttd_front_requests", "Requests the front answered, by model (empty: not an "
                                "inference) and HTTP status", ["model", "code"], registry=self.registry)
        self.refusals = Counter("ttd_front_refusals", "Requests the front refused itself before tritonserver saw "
                                "them, by reason", ["reason"], registry=self.registry)
        self.connection_refusals = Counter(
            "ttd_front_connection_refusals", "Connections the front refused or closed itself, by reason: "
            "connection_cap and per_client_cap (refused when opened), evicted_idle (an idle one closed at the cap "
            "for a new one), header_timeout, write_stalled (an answer not read), malformed_http",
            ["reason"], registry=self.registry)
        for reason in CONNECTION_REASONS:  # each reason is a series from the start, at 0
            self.connection_refusals.labels(reason)
        self.latency = Histogram("ttd_front_request_duration_seconds", "Inference requests through the front, "
                                 "from the request header to the answer (seconds)", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sent_images = Histogram("ttd_front_coalesced_request_images", "Images per inference request the "
                                     "front's coalescer sent to tritonserver (1: a request sent alone), by model",
                                     ["model"], buckets=IMAGE_BUCKETS, registry=self.registry)
        self.restarts = Counter("ttd_tritonserver_restarts", "tritonserver restarts after it died",
                                registry=self.registry)
        self.triton_up = Gauge("ttd_tritonserver_metrics_up", "1 when tritonserver's own metrics were read for "
                               "this scrape", registry=self.registry)

    def refused(self, status: int) -> None:
        self.refusals.labels(REFUSAL_REASONS.get(status, str(status))).inc()

    def connection_refused(self, reason: str) -> None:
        self.connection_refusals.labels(reason).inc()

    def answered(self, model: str, status: int, seconds: float | None) -> None:
        self.requests.labels(model, str(status)).inc()
        if model and seconds is not None:
            self.latency.labels(model).observe(seconds)

    def sent(self, model: str, images: int) -> None:
        self.sent_images.labels(model).observe(images)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


@dataclass
class MetricsSite:
    """The metrics port, served on the front's event loop."""

    url: str
    runner: web.AppRunner
    loop: asyncio.AbstractEventLoop

    def stop(self, timeout_s: float = 10) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout_s)


def start_metrics(loop: asyncio.AbstractEventLoop, host: str, port: int, metrics: FrontMetrics,
                  triton_metrics_url: str | None) -> MetricsSite:
    """Serve `GET /metrics` on host:port from `loop` (the front's); raises RuntimeProblem when
    the port cannot be bound."""

    async def scrape(request: web.Request) -> web.Response:
        triton = b""
        if triton_metrics_url:
            try:
                async with ClientSession(timeout=ClientTimeout(total=5)) as session:
                    async with session.get(f"http://{triton_metrics_url}/metrics") as answer:
                        triton = await answer.read() if answer.status == 200 else b""
            except (ClientError, asyncio.TimeoutError):
                triton = b""
        metrics.triton_up.set(1 if triton else 0)
        return web.Response(body=metrics.render() + triton,
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def open_site() -> None:
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_address=True).start()

    try:
        asyncio.run_coroutine_threadsafe(open_site(), loop).result(30)
    except OSError as error:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        raise RuntimeProblem(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from error
    return MetricsSite(f"{host}:{port}", runner, loop)
