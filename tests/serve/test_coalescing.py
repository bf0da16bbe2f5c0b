"""The front's coalescing (docs/serving.md, "Coalescing") without a server: which requests may be
coalesced, the merged request, the split answer (ttd/serve/coalescing.py), and the coalescer's
policy against a stand-in tritonserver (ttd/serve/front_coalescer.py)."""

import asyncio
import json

import numpy as np
import pytest

from ttd.serve.coalescing import merged_request, one_image, split_answer
from ttd.serve.front_coalescer import Coalescer

tritonclient_http = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.deadline(60)


def request_body(images: list[bytes], captions: list[str], **extra) -> tuple[bytes, int]:
    """The body tritonclient sends for these images and captions (a batch of len(images))."""
    inputs = []
    for name, values in (("image", images), ("caption", [c.encode() for c in captions])):
        array = np.array([[v] for v in values], dtype=np.object_)
        tensor = tritonclient_http.InferInput(name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    body, length = tritonclient_http.InferenceServerClient.generate_request_body(inputs, **extra)
    return body, length if length is not None else len(body)


def parsed(body: bytes, length: int) -> dict:
    return json.loads(body[:length])


def element(value: bytes) -> bytes:
    return len(value).to_bytes(4, "little") + value


def answer(rows: list[tuple[list[str], list[float], list[bool]]]) -> tuple[bytes, int]:
    """An answer as tritonserver writes it (compact JSON header, then binary outputs), rows padded
    to the longest tag list as the fused tagger pads them."""
    width = max(len(tags) for tags, _, _ in rows)
    tags = b"".join(element(t.encode()) for r in rows for t in r[0] + [""] * (width - len(r[0])))
    scores = np.array([r[1] + [0.0] * (width - len(r[1])) for r in rows], np.float32).tobytes()
    selected = np.array([r[2] + [False] * (width - len(r[2])) for r in rows], np.bool_).tobytes()
    outputs = [{"name": name, "datatype": kind, "shape": [len(rows), width], "parameters": {"binary_data_size": len(data)}}
               for name, kind, data in (("tags", "BYTES", tags), ("scores", "FP32", scores), ("selected", "BOOL", selected))]
    header = json.dumps({"model_name": "ttd_tagger", "model_version": "1", "outputs": outputs},
                        separators=(",", ":")).encode()
    return header + tags + scores + selected, len(header)


ROWS = [(["red", "circle"], [0.9, 0.2], [True, False]), (["blue"], [0.7], [True]),
        (["snow", "person", "tree"], [0.1, 0.8, 0.6], [False, True, True])]


def test_requests_merge_into_the_body_tritonclient_sends_for_all_their_images():
    singles = [request_body([b"png%d" % k * (k + 1)], [f"caption {k}"]) for k in range(3)]
    ones = [one_image(parsed(b, n), b, n, {}) for b, n in singles]
    assert all(o is not None for o in ones) and len({o.key for o in ones}) == 1
    assert merged_request(ones) == request_body([b"png0", b"png1png1", b"png2png2png2"], ["caption 0", "caption 1", "caption 2"])


def test_only_requests_whose_answer_can_be_rebuilt_are_coalesced():
    body, n = request_body([b"png"], ["a caption"])
    request = parsed(body, n)
    assert one_image(request, body, n, {"Accept-Encoding": "identity"}) is not None
    assert one_image(request, body, n, {"Accept-Encoding": "gzip"}) is None  # a compressed answer
    assert one_image({**request, "id": "7"}, body, n, {}) is None  # the answer would carry the id
    assert one_image({**request, "outputs": [{"name": "tags"}]}, body, n, {}) is None
    assert one_image({**request, "parameters": {}}, body, n, {}) is None  # JSON outputs: numbers as Triton prints them
    two, m = request_body([b"a", b"b"], ["x", "y"])
    assert one_image(parsed(two, m), two, m, {}) is None  # already several images
    masks = {**request, "inputs": [*request["inputs"], {"name": "return_masks", "datatype": "BOOL", "shape": [1, 1],
                                                        "parameters": {"binary_data_size": 1}}]}
    assert one_image(masks, body + b"\x01", n, {}) is None
    other_tags = {"name": "tags", "datatype": "BYTES", "shape": [1, 3], "parameters": {"binary_data_size": 0}}
    keys = {one_image({"inputs": [request["inputs"][0], {**other_tags, "shape": [1, t]}],
                       "parameters": {"binary_data_output": True}}, body, n, {}).key for t in (2, 3)}
    assert len(keys) == 2  # tag lists of different lengths are not one tensor


def test_an_answer_splits_into_what_each_image_alone_is_answered():
    merged, length = answer(ROWS)
    assert split_answer(merged, length, 3) == [answer([row]) for row in ROWS]
    assert split_answer(*answer(ROWS[1:2]), 1) == [answer(ROWS[1:2])]


def test_an_answer_not_laid_out_as_padded_rows_is_not_split():
    merged, length = answer(ROWS)
    with pytest.raises(ValueError, match="not \\[2, tags"):
        split_answer(merged, length, 2)
    with pytest.raises(ValueError, match="do not add up"):
        split_answer(merged + b"x", length, 3)
    gap, gap_length = answer([(["red", "", "circle"], [0.1, 0.2, 0.3], [True, False, True])])
    with pytest.raises(ValueError, match="an empty tag before a real one"):
        split_answer(gap, gap_length, 1)


class StandIn:
    """tritonserver stand-in: answers a request of N images after `release` is set, with the
    rows of ROWS (by caption number) as the fused tagger would; a caption 'bad' refuses the whole
    request (400), as one bad image does."""

    def __init__(self) -> None:
        self.sent: list[int] = []  # images per request received
        self.release = asyncio.Event()

    async def __call__(self, path: str, headers: dict, body: bytes):
        length = int(headers["Inference-Header-Content-Length"])
        header = json.loads(body[:length])
        images = header["inputs"][0]["shape"][0]
        self.sent.append(images)
        await self.release.wait()
        captions, data = [], body[length + header["inputs"][0]["parameters"]["binary_data_size"]:]
        while data:
            size = int.from_bytes(data[:4], "little")
            captions.append(data[4 : 4 + size].decode())
            data = data[4 + size :]
        if "bad" in captions:
            return 400, {"Content-Type": "text/plain"}, b'{"error":"cannot decode image"}'
        merged, merged_length = answer([ROWS[int(c)] for c in captions])
        return 200, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(merged_length)}, merged


async def turns(count: int = 3) -> None:
    """A few turns of the event loop, no timer: a task started now has sent by then."""
    for _ in range(count):
        await asyncio.sleep(0)


def submit(coalescer: Coalescer, caption: str, max_images: int = 32):
    body, n = request_body([b"png"], [caption])
    return asyncio.ensure_future(coalescer.submit("/v2/models/ttd_tagger/infer", one_image(parsed(body, n), body, n, {}),
                                                  body, n, max_images))


async def one_then_pending(captions: list[str], max_images: int = 32, max_bytes: int = 1 << 20,
                           pending_checked: bool = False) -> tuple[list[int], list]:
    """Caption "0" sent alone, then `captions` sent while it is at the stand-in (one place):
    the images of each request the stand-in received, and every answer."""
    server = StandIn()
    coalescer = Coalescer(server, in_flight=1, max_bytes=max_bytes)
    first = submit(coalescer, "0", max_images)
    await turns()
    assert server.sent == [1]  # nothing waited for company
    rest = [submit(coalescer, c, max_images) for c in captions]
    if pending_checked:
        await asyncio.sleep(0.01)
        assert server.sent == [1]  # the one place is taken: they pend in the front
    server.release.set()
    return server.sent, await asyncio.gather(first, *rest)


def test_a_lone_request_goes_at_once_and_pending_ones_go_together_when_a_place_frees():
    sent, answers = asyncio.run(one_then_pending(["1", "2", "0"], pending_checked=True))
    assert sent == [1, 3]
    for got, row in zip(answers, [ROWS[0], ROWS[1], ROWS[2], ROWS[0]]):
        body, length = answer([row])
        assert got == (200, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)},
                       body)


def test_a_coalesced_request_is_bounded_by_images_and_bytes():
    captions = [str(k % 3) for k in range(7)]
    assert asyncio.run(one_then_pending(captions, max_images=3))[0] == [1, 3, 3, 1]
    body, n = request_body([b"png"], ["0"])
    assert asyncio.run(one_then_pending(captions, max_bytes=2 * (len(body) - n)))[0] == [1, 2, 2, 2, 1]


def test_a_refused_coalesced_request_is_sent_again_image_by_image():
    sent, answers = asyncio.run(one_then_pending(["1", "bad", "2"]))
    assert sent == [1, 3, 1, 1, 1]
    assert [a[0] for a in answers] == [200, 200, 400, 200]
    assert answers[2][2] == b'{"error":"cannot decode image"}'
    assert answers[3][2] == answer([ROWS[2]])[0]


def test_a_backend_failure_reaches_every_client_of_the_request():
    class Gone(Exception):
        pass

    async def failing(path, headers, body):
        raise Gone("the inference server failed this request twice")

    async def main():
        coalescer = Coalescer(failing, in_flight=1, max_bytes=1 << 20)
        return await asyncio.gather(*(submit(coalescer, "0") for _ in range(3)), return_exceptions=True)

    assert [type(a) for a in asyncio.run(main())] == [Gone] * 3
