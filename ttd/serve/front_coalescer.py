"""The front's coalescing of one-image inference requests (docs/serving.md, "Coalescing").

Per inference path, at most `in_flight` requests are at tritonserver at once. A request that
finds a free place goes at once, alone: nothing waits for company. Requests that arrive while
every place is taken pend in the front (they would have queued in tritonserver otherwise), and
when a place frees, the pending ones of one input signature go as one request of several images
(at most `max_images` of them and `max_bytes` of tensor data). Its answer is split into the answer
each would have had alone (ttd/serve/coalescing.py). When the several-image request fails (one
bad image refuses the whole request), each request is sent again alone, so every client gets
exactly its own answer or its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ttd.serve.coalescing import OneImage, merged_request, split_answer

# (status, the answer's headers passed on, body) of one exchange with tritonserver
Answer = tuple[int, dict[str, str], bytes]
# sends (path, headers, body) to tritonserver, retrying as the front does; raises its Refusal
Exchange = Callable[[str, dict[str, str], bytes], Awaitable[Answer]]
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class Waiting:
    request: OneImage
    body: bytes  # the client's own body, sent as it is when the request goes alone
    header_length: int
    answer: asyncio.Future


@dataclass
class Lane:
    """The requests of one inference path: how many are at tritonserver, and the pending ones."""

    running: int = 0
    pending: list[Waiting] = field(default_factory=list)


def binary_headers(header_length: int) -> dict[str, str]:
    return {HEADER_LENGTH: str(header_length), "Content-Type": "application/octet-stream"}


class Coalescer:
    def __init__(self, exchange: Exchange, in_flight: int, max_bytes: int,
                 observe: Callable[[str, int], None] | None = None) -> None:
        """`observe(path, images)`: called for every request sent to tritonserver (metrics)."""
        self.exchange, self.in_flight, self.max_bytes = exchange, in_flight, max_bytes
        self.observe = observe or (lambda path, images: None)
        self.lanes: dict[str, Lane] = {}
        self.tasks: set[asyncio.Task] = set()

    async def submit(self, path: str, request: OneImage, body: bytes, header_length: int, max_images: int) -> Answer:
        """The answer to `request` (sent to `path`), alone or as part of a several-image request."""
        lane = self.lanes.setdefault(path, Lane())
        waiting = Waiting(request, body, header_length, asyncio.get_running_loop().create_future())
        lane.pending.append(waiting)
        self._start(path, lane, max(1, max_images))
        return await waiting.answer

    def _start(self, path: str, lane: Lane, max_images: int) -> None:
        while lane.pending and lane.running < self.in_flight:
            key, size = lane.pending[0].request.key, 0
            group: list[Waiting] = []
            rest: list[Waiting] = []
            for waiting in lane.pending:
                if waiting.answer.done():  # its client went away
                    continue
                fits = not group or (size + len(waiting.request.data) <= self.max_bytes and len(group) < max_images)
                if waiting.request.key == key and fits:
                    group.append(waiting)
                    size += len(waiting.request.data)
                else:
                    rest.append(waiting)
            lane.pending = rest
            if not group:
                continue
            lane.running += 1
            task = asyncio.get_running_loop().create_task(self._send(path, lane, group, max_images))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, path: str, lane: Lane, group: list[Waiting], max_images: int) -> None:
        try:
            answers = await self._answers(path, group)
        except Exception as error:  # the front's Refusal (tritonserver gone): every client of the group gets it
            answers = [error] * len(group)
        finally:
            lane.running -= 1
            self._start(path, lane, max_images)
        for waiting, answer in zip(group, answers):
            if waiting.answer.done():
                continue
            if isinstance(answer, BaseException):
                waiting.answer.set_exception(answer)
            else:
                waiting.answer.set_result(answer)

    async def _alone(self, path: str, waiting: Waiting) -> Answer:
        self.observe(path, 1)
        return await self.exchange(path, binary_headers(waiting.header_length), waiting.body)

    async def _answers(self, path: str, group: list[Waiting]) -> list[Answer | BaseException]:
        if len(group) == 1:
            return [await self._alone(path, group[0])]
        body, header_length = merged_request([w.request for w in group])
        self.observe(path, len(group))
        status, headers, answer = await self.exchange(path, binary_headers(header_length), body)
        if status == 200 and HEADER_LENGTH in headers:
            try:
                rows = split_answer(answer, int(headers[HEADER_LENGTH]), len(group))
            except (ValueError, KeyError, TypeError):
                rows = None
            if rows is not None:
                kept = {name: value for name, value in headers.items() if name != HEADER_LENGTH}
                return [(status, {**kept, HEADER_LENGTH: str(length)}, row) for row, length in rows]
        # one image refused the whole request (or its answer was not as expected): each goes alone
        return list(await asyncio.gather(*(self._alone(path, w) for w in group), return_exceptions=True))
