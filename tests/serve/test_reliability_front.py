"""The HTTP front's checks (issue #8, item 1), without a server: every body tritonserver 2.51
would answer with HTTP 500 (or die on) is refused here with a 4xx and the reason. The same cases
against a running `ttd serve` are in test_reliability_serve.py."""

import gzip
import json
import zlib

import pytest

from ttd.serve.http_front import FrontLimits, Refusal, check_headers, check_infer_body, check_route, decompress

IMAGE = {"name": "image", "shape": [1, 1], "datatype": "BYTES"}


def refusal(call, *args) -> tuple[int, str]:
    with pytest.raises(Refusal) as caught:
        call(*args)
    return caught.value.status, caught.value.reason


def binary(header: dict, tensor_bytes: bytes) -> tuple[bytes, int]:
    text = json.dumps(header).encode()
    return text + tensor_bytes, len(text)


@pytest.mark.parametrize("body, reason", [
    (b"", "empty body"),
    (b"{not json", "the inference request is not valid JSON: Expecting property name"),
    (b"a=1&b=2", "the inference request is not valid JSON"),
    ('{"inputs": []}'.encode("utf-16"), "the inference request is not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "the inference request is nested too deeply"),
    (b"[]", "the inference request must be a JSON object"),
    (b"{}", "'inputs' must be a list of input tensors"),
    (b'{"inputs": "x"}', "'inputs' must be a list of input tensors"),
    (b'{"inputs": [3]}', "inputs[0] must be an object"),
    (b'{"inputs": [{"shape": [1], "datatype": "BYTES"}]}', "inputs[0]: 'name' must be a string"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "data": ["x"]}]}', "input 'image': 'shape' must be a list"),
    (b'{"inputs": [{"name": "image", "shape": [-1, 1], "datatype": "BYTES"}]}', "'shape' must be a list of non-negative"),
    (b'{"inputs": [{"name": "image", "shape": [true], "datatype": "BYTES"}]}', "'shape' must be a list of non-negative"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', "NaN is not a JSON number"),
    (b'{"inputs": [], "outputs": [3]}', "'outputs' must be a list of objects with a 'name'"),
    (b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 4}}]}',
     "inputs declare binary_data_size but the request has no Inference-Header-Content-Length header"),
])
def test_json_bodies_tritonserver_would_answer_500_are_refused_400(body, reason):
    status, message = refusal(check_infer_body, body, None)
    assert status == 400 and reason in message, message


def test_binary_framing_whose_lengths_lie_is_refused():
    body, header_length = binary({"inputs": [{**IMAGE, "parameters": {"binary_data_size": 8}}]}, b"\0" * 8)
    check_infer_body(body, header_length)  # consistent framing passes
    assert refusal(check_infer_body, body, len(body) + 1) == (
        400, f"Inference-Header-Content-Length is {len(body) + 1:,} but the body has only {len(body):,} bytes")
    status, message = refusal(check_infer_body, body, header_length - 1)  # the header cut short
    assert status == 400 and "the inference header is not valid JSON" in message
    short, short_length = binary({"inputs": [{**IMAGE, "parameters": {"binary_data_size": 8}}]}, b"\0" * 5)
    assert refusal(check_infer_body, short, short_length) == (
        400, "the inputs' binary_data_size add up to 8 bytes but 5 bytes of tensor data follow the JSON header")
    assert refusal(check_headers, "", "12x", "", 40, FrontLimits()) == (
        400, "Inference-Header-Content-Length '12x' is not a positive integer")


def test_headers_alone_refuse_a_large_body_or_a_form_before_it_is_read():
    limits = FrontLimits(max_body_bytes=1000)
    assert refusal(check_headers, "application/json", None, "", 2_000_000_000, limits) == (
        413, "body of 2,000,000,000 bytes exceeds the limit of 1,000")
    status, message = refusal(check_headers, "multipart/form-data", None, "", 10, limits)
    assert status == 415 and "'multipart/form-data' is not accepted" in message
    assert refusal(check_headers, "application/xml", "10", "", 10, limits)[0] == 415
    assert check_headers("application/x-www-form-urlencoded", None, "", 10, limits) is None  # `curl -d`: checked as JSON
    assert refusal(check_headers, "application/json", None, "br", 10, limits)[0] == 415
    assert check_headers("", None, "", None, limits) is None  # tritonclient sends no content type
    assert check_headers("application/octet-stream", "17", "gzip", 500, limits) == 17


def test_compressed_bodies_are_inflated_under_the_same_bound():
    limits = FrontLimits(max_body_bytes=1000)
    assert decompress(gzip.compress(b"x" * 1000), "gzip", limits) == b"x" * 1000
    assert decompress(zlib.compress(b"{}"), "deflate", limits) == b"{}"
    assert refusal(decompress, gzip.compress(b"\0" * 10_000_000), "gzip", limits) == (
        413, "decompressed body exceeds the limit of 1,000 bytes")  # a 10 KB bomb
    assert refusal(decompress, b"not gzip", "gzip", limits)[0] == 400
    assert refusal(decompress, gzip.compress(b"{}")[:-12], "gzip", limits) == (400, "body is truncated gzip data")


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v2/systemsharedmemory/region/r/register", 404),
    ("POST", "/v2/repository/models/ttd_tagger/unload", 404),
    ("POST", "/v2/logging", 404),
    ("GET", "/v2/models/ttd_tagger/infer", 405),
    ("POST", "/v2/models/ttd_tagger/config", 405),
])
def test_operator_endpoints_are_not_exposed(method, path, status):
    assert refusal(check_route, method, path)[0] == status
    for method, path in (("GET", "/v2/health/ready"), ("GET", "/v2"), ("GET", "/v2/models/ttd_tagger/config"),
                         ("GET", "/v2/models/ttd_tagger/versions/1/stats"), ("POST", "/v2/models/ttd_tagger/infer")):
        check_route(method, path)


def test_a_batch_or_tag_count_past_the_models_bounds_is_refused_from_the_header():
    """Item 12: the tag head called directly with a huge tag list is refused by the front from the
    request's shape, before the tensor reaches tritonserver (the model's own cap came after it was
    copied there)."""
    from ttd.serve.http_front import ModelShapes, shape_problem

    config = {"max_batch_size": 32, "parameters": {"max_variable_dim": {"string_value": "1024"}},
              "input": [{"name": "patch_embeds", "dims": ["128", "8", "8"]}, {"name": "tag_embeds", "dims": [-1, 128]}]}
    shapes = ModelShapes.from_config(config)

    def request(batch: int, tags: int) -> dict:
        return {"inputs": [{"name": "patch_embeds", "shape": [batch, 128, 8, 8], "datatype": "FP32"},
                           {"name": "tag_embeds", "shape": [batch, tags, 128], "datatype": "FP32"}]}

    assert shape_problem(request(32, 1024), shapes) is None
    assert shape_problem(request(1, 200_000), shapes) == (
        "input 'tag_embeds': dimension 1 is 200000, more than the limit of 1024")  # the model's own words
    assert shape_problem(request(33, 2), shapes) == "input 'patch_embeds': batch of 33 is more than the model's max_batch_size 32"
    no_bound = ModelShapes.from_config({"max_batch_size": 0, "input": [{"name": "tag_embeds", "dims": [-1, 128]}]})
    assert shape_problem({"inputs": [{"name": "tag_embeds", "shape": [5000, 128]}]}, no_bound) is None
