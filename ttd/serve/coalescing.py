"""Several one-image `ttd_tagger` requests as one request of several images, and its answer back
as the answers each would have had alone (docs/serving.md, "Coalescing"). Pure functions of
KServe v2 binary-tensor bodies (a JSON header of `Inference-Header-Content-Length` bytes, then
each tensor's bytes in input order), used by the front's coalescer (ttd/serve/front_coalescer.py).

Only requests whose answer can be rebuilt byte for byte are coalesced: binary inputs with a batch
of 1 and nothing but `binary_data_size` as their parameters, binary outputs (`binary_data_output`,
what tritonclient asks for by default), no request id, no output selection, no masks asked for
(`return_masks`), no compressed answer. Everything else is forwarded as it came.

The answer of several images stacks theirs on the batch axis, padded on the tag axis (axis 1 of
every output) to the longest tag list, a padded tag being empty (ttd/serve/tagger_requests.py,
`stacked_answer`); a row's own tags are its tags up to the first empty one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

SIZE = "binary_data_size"
ITEM_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
              "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
NOT_COALESCED_INPUTS = {"return_masks"}  # an answer with masks is large: its request's own cost dominates
TAG_OUTPUT = "tags"


@dataclass(frozen=True)
class OneImage:
    """A coalescable request: its checked JSON header and the tensor bytes after it."""

    header: dict
    data: bytes

    @property
    def key(self) -> tuple:
        """Requests with the same key can go as one: the same inputs, types and per-image shapes."""
        return tuple((t["name"], t["datatype"], tuple(t["shape"][1:])) for t in self.header["inputs"])


def one_image(request: dict, body: bytes, header_length: int, headers: Mapping[str, str]) -> OneImage | None:
    """The request as a OneImage when its answer can be rebuilt from a coalesced one, else None.
    `request`: its JSON header, already checked (http_front.check_infer_body); `headers`: the
    client's HTTP headers."""
    if headers.get("Accept-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    if set(request) - {"inputs", "parameters"} or request.get("parameters") != {"binary_data_output": True}:
        return None
    for tensor in request["inputs"]:
        if (set(tensor) != {"name", "datatype", "shape", "parameters"} or set(tensor["parameters"]) != {SIZE}
                or not tensor["shape"] or tensor["shape"][0] != 1 or tensor["name"] in NOT_COALESCED_INPUTS):
            return None
    return OneImage(request, body[header_length:])


def merged_request(requests: list[OneImage]) -> tuple[bytes, int]:
    """One body holding every request's images (all of one key), and its JSON header's length."""
    inputs, parts = [], []
    offsets = [0] * len(requests)
    for position, tensor in enumerate(requests[0].header["inputs"]):
        size = 0
        for k, request in enumerate(requests):
            length = request.header["inputs"][position]["parameters"][SIZE]
            parts.append(request.data[offsets[k] : offsets[k] + length])
            offsets[k] += length
            size += length
        inputs.append({"name": tensor["name"], "shape": [len(requests), *tensor["shape"][1:]],
                       "datatype": tensor["datatype"], "parameters": {SIZE: size}})
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    return header + b"".join(parts), len(header)


def _bytes_elements(data: bytes, count: int) -> list[bytes]:
    """The `count` length-prefixed elements of a BYTES tensor (each element the bytes with their prefix)."""
    elements, at = [], 0
    for _ in range(count):
        if at + 4 > len(data):
            raise ValueError("a BYTES output ends inside an element's length")
        end = at + 4 + int.from_bytes(data[at : at + 4], "little")
        if end > len(data):
            raise ValueError("a BYTES output ends inside an element")
        elements.append(data[at:end])
        at = end
    if at != len(data):
        raise ValueError("a BYTES output has bytes after its elements")
    return elements


def _product(values: list[int]) -> int:
    product = 1
    for v in values:
        product *= v
    return product


def split_answer(body: bytes, header_length: int, count: int) -> list[tuple[bytes, int]]:
    """The answers (body, JSON header length) of the `count` requests merged in the order given,
    from the merged request's answer; ValueError when the answer is not laid out as expected (the
    caller then sends each request alone)."""
    header = json.loads(body[:header_length])
    outputs, data, at = header["outputs"], body[header_length:], 0
    pieces = []  # per output: its rows' bytes, each as a list of per-tag byte strings
    for output in outputs:
        shape, size = output["shape"], output["parameters"][SIZE]
        if set(output["parameters"]) != {SIZE} or len(shape) < 2 or shape[0] != count:
            raise ValueError(f"output {output['name']!r} is not [{count}, tags, ...] binary data")
        chunk, at = data[at : at + size], at + size
        per_tag = _product(shape[2:])
        if output["datatype"] == "BYTES":
            elements = _bytes_elements(chunk, _product(shape))
            tags = [b"".join(elements[i : i + per_tag]) for i in range(0, len(elements), per_tag)]
        else:
            step = per_tag * ITEM_BYTES[output["datatype"]]
            if len(chunk) != _product(shape) * ITEM_BYTES[output["datatype"]]:
                raise ValueError(f"output {output['name']!r} has {len(chunk)} bytes, not its shape's")
            tags = [chunk[i : i + step] for i in range(0, len(chunk), step)]
        pieces.append([tags[r * shape[1] : (r + 1) * shape[1]] for r in range(count)])
    if at != len(data) or not outputs:
        raise ValueError("the answer's tensor bytes do not add up to its outputs")
    names = [o["name"] for o in outputs]
    if TAG_OUTPUT not in names or len({o["shape"][1] for o in outputs}) != 1:
        raise ValueError("the answer has no tag output, or outputs of different tag counts")
    empty = (0).to_bytes(4, "little")
    answers = []
    for r, row_tags in enumerate(pieces[names.index(TAG_OUTPUT)]):
        width = next((k for k, tag in enumerate(row_tags) if tag == empty), len(row_tags))
        if any(tag != empty for tag in row_tags[width:]):
            raise ValueError(f"row {r}: an empty tag before a real one (not padding)")
        row_outputs, row_data = [], []
        for output, rows in zip(outputs, pieces):
            kept = b"".join(rows[r][:width])
            row_outputs.append({**output, "shape": [1, width, *output["shape"][2:]],
                                "parameters": {**output["parameters"], SIZE: len(kept)}})
            row_data.append(kept)
        row_header = json.dumps({**header, "outputs": row_outputs}, separators=(",", ":"), ensure_ascii=False).encode()
        answers.append((row_header + b"".join(row_data), len(row_header)))
    return answers
