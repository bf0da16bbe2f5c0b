"""`ttd serve` as a library function: tritonserver on a loopback port behind the HTTP front
(ttd/serve/http_front.py), restarted when it dies, stopped cleanly on Ctrl-C / SIGTERM.

Only the front listens on the public address. tritonserver's HTTP port is a free loopback port
chosen once (a restart reuses it, so the front's target never changes). gRPC has no front: it is
off unless a port is asked for, and then bound to 127.0.0.1 only, whatever `host` is."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from ttd.serve.http_front import FrontLimits, start_front
from ttd.serve.metrics import FrontMetrics, start_metrics
from ttd.serve.repository import record_problems, recorded_flavour
from ttd.model.contract import TAGGER_MODEL
from ttd.serve.triton_server import ServerError, TritonServer, start_server, stop_on_signals, supervise


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_repository(repo: Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int | None = None,
                     timeout_s: float = 120, max_restarts: int = 5, limits: FrontLimits = FrontLimits(),
                     say: Callable[[str], None] = print, metrics_port: int | None = None,
                     metrics_host: str = "127.0.0.1") -> int:
    """Serve `repo` until stopped; returns the exit code. Raises ServerError (tritonserver did not
    start, or `repo` is not the files `ttd triton build` wrote), FrontError (the public port
    cannot be bound) or RuntimeProblem (the metrics port cannot be bound), leaving nothing
    running. `metrics_port`: the front's and tritonserver's Prometheus metrics on
    metrics_host:metrics_port (ttd/serve/metrics.py); None: no metrics."""
    if not (repo / TAGGER_MODEL / "config.pbtxt").is_file():
        raise ServerError(f"{repo} is not a TTD model repository (create one with `ttd triton build`)")
    problems = record_problems(repo)
    if problems:
        raise ServerError(f"{repo} is not served: " + "; ".join(problems))
    if limits.coalesce_in_flight and (flavour := recorded_flavour(repo)) != "fused":
        raise ServerError(f"--coalesce sends several images a request, which only the fused tagger takes; {repo} is "
                          f"the {flavour} flavour: leave --coalesce out, or build with `ttd triton build --flavour fused`")
    backend_port = free_loopback_port()
    triton_metrics_port = free_loopback_port() if metrics_port else None
    metrics = FrontMetrics() if metrics_port else None

    def start() -> TritonServer:
        return start_server(repo, "127.0.0.1", backend_port, grpc_port, timeout_s, metrics_port=triton_metrics_port)

    def restart() -> TritonServer:
        server = start()
        if metrics is not None:
            metrics.restarts.inc()
        return server

    with stop_on_signals():
        try:
            server = start()
        except KeyboardInterrupt:
            return 0
        try:
            front = start_front(host, http_port, server.http_url, limits, say, metrics)
        except BaseException:
            server.stop()
            raise
        site = None
        if metrics is not None:
            try:
                site = start_metrics(front.loop, metrics_host, metrics_port, metrics,
                                     f"127.0.0.1:{triton_metrics_port}")
            except BaseException:
                front.stop()
                server.stop()
                raise
        grpc = f", gRPC 127.0.0.1:{grpc_port} (loopback only, no front)" if grpc_port else ", no gRPC"
        shown = f", metrics http://{site.url}/metrics" if site else ""
        say(f"serving {repo}: HTTP {front.url} (front, bodies up to {limits.max_body_bytes:,} bytes, at most "
            f"{front.connections.cap:,} connections; tritonserver "
            f"on {server.http_url}){grpc}{shown} (Ctrl-C to stop)")

        def stop_front() -> None:
            if site is not None:
                site.stop()
            front.stop()

        try:
            return supervise(server, restart, say, max_restarts, before_stop=stop_front)
        finally:
            stop_front()
