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
from ttd.serve.repository import record_problems
from ttd.model.contract import TAGGER_MODEL
from ttd.serve.triton_server import ServerError, TritonServer, start_server, stop_on_signals, supervise


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_repository(repo: Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int | None = None,
                     timeout_s: float = 120, max_restarts: int = 5, limits: FrontLimits = FrontLimits(),
                     say: Callable[[str], None] = print) -> int:
    """Serve `repo` until stopped; returns the exit code. Raises ServerError (tritonserver did not
    start, or `repo` is not the files `ttd triton build` wrote) or FrontError (the public port
    cannot be bound), leaving nothing running."""
    if not (repo / TAGGER_MODEL / "config.pbtxt").is_file():
        raise ServerError(f"{repo} is not a TTD model repository (create one with `ttd triton build`)")
    problems = record_problems(repo)
    if problems:
        raise ServerError(f"{repo} is not served: " + "; ".join(problems))
    backend_port = free_loopback_port()

    def start() -> TritonServer:
        return start_server(repo, "127.0.0.1", backend_port, grpc_port, timeout_s)

    with stop_on_signals():
        try:
            server = start()
        except KeyboardInterrupt:
            return 0
        try:
            front = start_front(host, http_port, server.http_url, limits, say)
        except BaseException:
            server.stop()
            raise
        grpc = f", gRPC 127.0.0.1:{grpc_port} (loopback only, no front)" if grpc_port else ", no gRPC"
        say(f"serving {repo}: HTTP {front.url} (front, bodies up to {limits.max_body_bytes:,} bytes, at most "
            f"{front.connections.cap:,} connections; tritonserver "
            f"on {server.http_url}){grpc} (Ctrl-C to stop)")
        try:
            return supervise(server, start, say, max_restarts, before_stop=front.stop)
        finally:
            front.stop()
