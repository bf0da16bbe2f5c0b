"""The front's HTTP/1.1 client to tritonserver: kept-alive connections on asyncio's own transports,
in place of aiohttp's ClientSession, which was a third of the front's CPU time per request
(docs/serving.md, "Where the cost per request is").

It speaks what an HTTP/1.1 server answers: a status line and headers, then a body framed by
Content-Length, by chunked transfer coding, or by the end of the connection (none after HEAD,
1xx, 204 and 304). A connection carries one request at a time and goes back to the pool only
after its answer was read whole. Reading pauses while a megabyte is buffered and unread (a
client slower than tritonserver does not make the front buffer a large answer).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

READ_LIMIT = 1 << 20  # bytes buffered before reading from tritonserver pauses
MAX_HEAD_BYTES = 64 << 10  # an answer's status line and headers


class BackendGone(ConnectionError):
    """tritonserver could not be reached, or the connection ended before the answer did."""


class Link(asyncio.Protocol):
    """One connection to tritonserver and the bytes it sent that are not read yet."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False  # tritonserver closed its side (or the connection broke)
        self.paused = False
        self.waiter: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_LIMIT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    @property
    def usable(self) -> bool:
        return not self.ended and self.transport is not None and not self.transport.is_closing()

    async def more(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for more bytes; False when the connection has ended instead
        (asyncio.TimeoutError when tritonserver sends nothing for that long)."""
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        if self.ended:
            return False
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, timeout_s)
        finally:
            self.waiter = None
        return bool(self.buffer) or not self.ended

    def close(self) -> None:
        self.ended = True
        if self.transport is not None:
            self.transport.close()


class Answer:
    """tritonserver's answer on `link`: status and headers (names lower-case), then its body,
    read whole (`read`) or piece by piece (`chunks`); `release` gives the connection back."""

    def __init__(self, link: Link, pool: BackendPool, status: int, headers: dict[str, str], bodiless: bool,
                 timeout_s: float) -> None:
        self.link, self.pool, self.status, self.headers, self.timeout_s = link, pool, status, headers, timeout_s
        self.chunked = not bodiless and "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.length: int | None = 0 if bodiless else None if self.chunked or length is None else int(length)
        self.done = self.length == 0
        self.reusable = "close" not in headers.get("connection", "").lower() and (self.length is not None or self.chunked)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.chunked:
            async for piece in self._chunked():
                yield piece
        elif self.length is not None:
            async for piece in self._exactly(self.length):
                yield piece
        else:  # framed by the end of the connection
            while await self._have(1, at_end_ok=True):
                piece = bytes(self.link.buffer)
                self.link.buffer.clear()
                yield piece
        self.done = True

    async def _have(self, count: int, at_end_ok: bool = False) -> bool:
        while len(self.link.buffer) < count:
            if not await self.link.more(self.timeout_s):
                if at_end_ok and not self.link.buffer:
                    return False
                if len(self.link.buffer) < count:
                    raise BackendGone("tritonserver closed the connection before its answer was complete")
        return True

    async def _exactly(self, count: int) -> AsyncIterator[bytes]:
        while count:
            await self._have(1)
            piece = bytes(self.link.buffer[:count])
            del self.link.buffer[: len(piece)]
            count -= len(piece)
            yield piece

    async def _line(self) -> bytes:
        while (end := self.link.buffer.find(b"\r\n")) < 0:
            if len(self.link.buffer) > MAX_HEAD_BYTES:
                raise BackendGone("a chunk header of tritonserver's answer is too long")
            await self._have(len(self.link.buffer) + 1)
        line = bytes(self.link.buffer[:end])
        del self.link.buffer[: end + 2]
        return line

    async def _chunked(self) -> AsyncIterator[bytes]:
        while True:
            try:
                size = int((await self._line()).split(b";", 1)[0], 16)
            except ValueError as error:
                raise BackendGone(f"tritonserver's chunked answer is malformed ({error})") from error
            if size == 0:
                while await self._line():  # trailers, up to the empty line
                    pass
                return
            async for piece in self._exactly(size):
                yield piece
            await self._line()

    def release(self) -> None:
        """The connection back to the pool when the answer was read whole, closed otherwise."""
        if self.done and self.reusable and not self.link.buffer and self.link.usable:
            self.pool.idle.append(self.link)
        else:
            self.link.close()


class BackendPool:
    """Kept-alive connections to tritonserver at host:port."""

    def __init__(self, host: str, port: int, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.host, self.port = host, port
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.idle: list[Link] = []

    async def _link(self) -> Link:
        while self.idle:
            link = self.idle.pop()
            if link.usable:
                return link
        loop = asyncio.get_running_loop()
        try:
            _, link = await asyncio.wait_for(loop.create_connection(Link, self.host, self.port), self.connect_timeout_s)
        except OSError as error:
            raise BackendGone(f"cannot connect to tritonserver at {self.host}:{self.port}: "
                              f"{error.strerror or error}") from error
        return link

    async def send(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Answer:
        """Send one request and read the answer's status and headers; the caller reads the body
        and releases the answer. Raises BackendGone or asyncio.TimeoutError."""
        link = await self._link()
        try:
            if link.transport is None:
                raise BackendGone("the connection to tritonserver was not made")
            lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            if body is not None:
                lines.append(f"Content-Length: {len(body)}")
            link.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
            while (end := link.buffer.find(b"\r\n\r\n")) < 0:
                if len(link.buffer) > MAX_HEAD_BYTES:
                    raise BackendGone("tritonserver's answer header is too long")
                if not await link.more(self.read_timeout_s):
                    raise BackendGone("tritonserver closed the connection before answering")
            head = link.buffer[:end].decode("latin-1").split("\r\n")
            del link.buffer[: end + 4]
            parts = head[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise BackendGone(f"tritonserver's answer does not start with an HTTP status line: {head[0][:80]!r}")
            status = int(parts[1])
            fields = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            if parts[0] == "HTTP/1.0" and "keep-alive" not in fields.get("connection", "").lower():
                fields["connection"] = "close"
        except BaseException:
            link.close()
            raise
        return Answer(link, self, status, fields, method == "HEAD" or status < 200 or status in (204, 304),
                      self.read_timeout_s)

    def reset(self) -> None:
        """Close the kept-alive connections (after one broke: tritonserver died, so do they)."""
        while self.idle:
            self.idle.pop().close()
