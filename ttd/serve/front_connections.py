"""The front's connections: a cap on how many are open, refusals of
malformed HTTP in the front's JSON, and one rate-limited log line per event instead of a traceback.

aiohttp's own options do the timeouts (`keepalive_timeout`: a connection must complete a request
header that long after opening or after its previous answer; bytes arriving do not extend it);
what aiohttp has no option for is here, in its connection handler.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from aiohttp import web
from aiohttp.web import RequestHandler


def connection_cap(wanted: int, reserve: int = 64) -> int:
    """`wanted`, lowered so that every admitted connection and its backend connection fit under
    the soft file-descriptor limit with `reserve` to spare (tritonserver's client, logs, files)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - reserve) // 2))


@dataclass
class RateLimitedLog:
    """At most one line per kind of event every `interval_s`; the next line of that kind says how
    many were left out. A flood of bad clients cannot grow the log faster than this."""

    say: Callable[[str], None]
    interval_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _last: dict[str, float] = field(default_factory=dict)
    _left_out: dict[str, int] = field(default_factory=dict)

    def __call__(self, kind: str, line: str) -> None:
        now = self.clock()
        if kind in self._last and now - self._last[kind] < self.interval_s:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        left_out = self._left_out.pop(kind, 0)
        self._last[kind] = now
        self.say(line + (f" (and {left_out:,} more like it in the last {self.interval_s:.0f} s)" if left_out else ""))


BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s")


MIN_AGE_S = 1.0  # a connection younger than this is never closed to make room (a burst of good clients)


@dataclass(eq=False)
class Connections:
    """The open connections of one front, oldest first, against its cap."""

    cap: int
    per_client: int = 0  # connections one address may hold; 0: half the cap (at least 1)
    opened: dict[FrontConnection, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.per_client <= 0:
            self.per_client = max(1, self.cap // 2)

    def make_room(self, now: float, host: str | None = None) -> FrontConnection | None:
        """At the cap: the longest-open connection that is not inside a request — a slow client
        that has not completed its header, or an idle keep-alive one — taken out to be closed
        (of `host` only, when given); None when every connection is in a request or newer than MIN_AGE_S."""
        for connection, since in self.opened.items():
            if host is not None and connection.peer.rsplit(":", 1)[0] != host:
                continue
            if not connection.busy and now - since >= MIN_AGE_S:
                del self.opened[connection]
                return connection
        return None


class FrontConnection(RequestHandler):
    """aiohttp's connection handler, with what the front adds to it: a cap on open connections
    (at the cap the longest-waiting idle connection is closed to make room, so slow clients
    cannot starve good ones; when every connection is in a request, one more is answered 503 and
    closed at once), refusals of malformed HTTP as JSON like every other refusal, and one
    rate-limited log line instead of a traceback per bad or vanished client. Every connection it
    refuses or closes itself is counted by reason (`count`: the metrics port's
    ttd_front_connection_refusals_total, docs/serving.md "Metrics"). `busy` counts the requests
    the front is handling on this connection and `partial` says that a request header has begun
    and not yet ended (ttd/serve/http_front.py clears it when the request is handled)."""

    def __init__(self, manager: web.Server, connections: Connections, log: RateLimitedLog,
                 write_timeout_s: float = 30.0, count: Callable[[str], None] = lambda reason: None,
                 **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self.connections, self.log, self.write_timeout_s, self.count = connections, log, write_timeout_s, count
        self.started, self.busy, self.partial, self.peer = False, 0, False, "?"
        self._write_stall: asyncio.TimerHandle | None = None

    # A write deadline (docs/serving.md, "The HTTP front"): a client that asks for a large answer
    # and never reads it fills the socket's buffers, and the transport pauses the writer. Paused
    # longer than `write_timeout_s`, the connection is aborted: four such clients had held every
    # slot of `--max-connections 4` (each busy, so never evicted) for 75 s and more.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_stall is None and self.write_timeout_s > 0:
            self._write_stall = asyncio.get_event_loop().call_later(self.write_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None

    def _stalled(self) -> None:
        self._write_stall = None
        self.count("write_stalled")
        self.log("stalled", f"front: closed a connection from {self.peer}: it read none of its answer for "
                            f"{self.write_timeout_s:g} s")
        if self.transport is not None:
            self.transport.abort()  # close() would wait for the buffer to drain, which it never will
        self.force_close()

    def _refuse(self, transport: asyncio.BaseTransport, kind: str, reason: str, line: str) -> None:
        body = json.dumps({"error": reason})
        transport.write(BUSY % (len(body), body.encode()))
        transport.close()
        self.log(kind, line)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = _peer(transport)
        now = time.monotonic()
        if len(self.connections.opened) >= self.connections.cap:
            victim = self.connections.make_room(now)
            if victim is None:
                self.count("connection_cap")
                body = json.dumps({"error": f"the server has {self.connections.cap} connections open, its limit, "
                                            "all in requests; retry later"})
                transport.write(BUSY % (len(body), body.encode()))
                transport.close()
                self.log("busy", f"front: refused a connection from {self.peer}: {self.connections.cap} connections "
                                 "open (the limit), all in requests")
                return
            victim.force_close()  # its connection_lost finds it already out of `opened`
            self.count("evicted_idle")
            self.log("evict", f"front: {self.connections.cap} connections open (the limit): closed the longest idle "
                              f"one (from {victim.peer}, no request under way) for a new one from {self.peer}")
        host = self.peer.rsplit(":", 1)[0]
        same = sum(1 for c in self.connections.opened if c.peer.rsplit(":", 1)[0] == host)
        if same >= self.connections.per_client:  # one address cannot take every slot
            victim = self.connections.make_room(now, host)
            if victim is not None:
                victim.force_close()
                self.count("evicted_idle")
                self.log("evict-address", f"front: {same} connections open from {host} (the limit per address): closed its "
                                  f"longest idle one (from {victim.peer}, no request under way) for a new one")
                same -= 1
        if same >= self.connections.per_client:
            self.count("per_client_cap")
            self._refuse(transport, "per-client", f"the server allows {self.connections.per_client} connections from "
                         "one address; close one, or retry later",
                         f"front: refused a connection from {self.peer}: {same} connections open from {host} (the "
                         "limit per address)")
            return
        self.started = True
        self.connections.opened[self] = now
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes of a request header, until http_front.handle sees the request
            self.partial = True
        super().data_received(data)

    def _process_keepalive(self) -> None:
        """aiohttp's keep-alive timer (private API: where it is missing, only this count is lost):
        a connection it closes in the middle of a request header timed out sending it."""
        closing = self.partial and not getattr(self, "_force_close", True)
        super()._process_keepalive()
        if closing and getattr(self, "_force_close", False):
            self.count("header_timeout")

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None
        if not self.started:  # refused at the cap: aiohttp never saw it
            return
        self.connections.opened.pop(self, None)
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        gone = isinstance(exc, ConnectionError)
        if message:  # aiohttp's parser: a malformed request line, header or framing
            self.count("malformed_http")
            reason = _parser_message(message)
            what = f"front: {status} to malformed HTTP from {request.remote}: {reason}"
        else:
            reason = _one_line(exc) if exc is not None else HTTPStatus(status).phrase
            what = (f"front: {'client went away' if gone else status} during {request.method} {request.path} from "
                    f"{request.remote}: {reason}")
        self.log("gone" if gone else f"http-{status}", what)
        if request.writer.output_size > 0:  # an answer was begun: nothing can be said any more
            raise ConnectionError("the answer was already begun")
        response = web.json_response({"error": reason if status < 500 else "internal error of the front"},
                                     status=status)
        response.force_close()
        return response

    def log_exception(self, *args, **kwargs) -> None:
        """aiohttp's other error reports (an unhandled exception): one rate-limited line, no traceback."""
        error = kwargs.get("exc_info")
        try:
            text = (str(args[0]) % args[1:]) if args else "error"
        except (TypeError, ValueError):
            text = " ".join(map(str, args))
        self.log("exception", f"front: {text}" + (f": {_one_line(error)}" if isinstance(error, BaseException) else ""))


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


def _parser_message(message: str, limit: int = 200) -> str:
    """aiohttp's parser message (a reason, then the offending bytes and a caret line) on one line."""
    parts = [line.strip() for line in message.splitlines() if line.strip() and set(line.strip()) != {"^"}]
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(error: BaseException) -> str:
    """`Type: message (at file:line)` of the innermost frame: enough to find a bug, one line."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ") + where
