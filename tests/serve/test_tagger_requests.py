"""The served taggers' request checks (ttd/serve/tagger_requests.py), without a server."""

import numpy as np
import pytest

from ttd.errors import InputError
from ttd.serve.tagger_requests import (answer_arrays, encoded_image, parse_request, request_rows, request_tags,
                                      rgb_image, stacked_answer, texts)


def test_tags_come_from_the_tag_list_or_the_caption():
    assert request_tags(None, [" Red ", "red", "", "circle"], 10) == ["red", "circle"]
    assert request_tags(["the orange heart near a circle"], None, 10) == ["orange", "heart", "circle"]
    with pytest.raises(InputError, match="empty caption"):
        request_tags(["   "], None, 10)
    with pytest.raises(InputError, match="no candidate tags"):
        request_tags(["and the of"], None, 10)
    with pytest.raises(InputError, match="send a caption or a list of tags"):
        request_tags(None, None, 10)
    with pytest.raises(InputError, match="3 tags exceed the limit of 2 per request"):
        request_tags(None, ["a", "b", "c"], 2)
    with pytest.raises(InputError, match="one caption per request, got 2"):
        request_tags(["a red circle", "a blue square"], None, 10)


def test_images_are_one_encoded_image_or_one_uint8_image_at_the_model_size():
    assert encoded_image(np.array([[b"png"]], dtype=object)) == b"png"
    with pytest.raises(InputError, match="exactly one image per request, got 2"):
        encoded_image(np.array([[b"a", b"b"]], dtype=object))
    with pytest.raises(InputError, match="image of 11 bytes exceeds the limit of 10"):
        encoded_image(np.array([[b"x" * 11]], dtype=object), max_bytes=10)
    pixels = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(1, 64, 64, 3)
    assert np.array_equal(rgb_image(pixels, 64), pixels[0])
    with pytest.raises(InputError, match=r"image_rgb must be one uint8 image of shape \[64, 64, 3\].*float32"):
        rgb_image(pixels.astype(np.float32), 64)
    with pytest.raises(InputError, match="got uint8 \\[2, 64, 64, 3\\]"):
        rgb_image(np.concatenate([pixels, pixels]), 64)
    assert texts(np.array([[b"a", "b"]], dtype=object)) == ["a", "b"] and texts(None) is None


def test_one_parser_reads_every_served_taggers_requests():
    """The fused model and the python flavour's BLS model both parse with parse_request: the fused
    one takes `image_rgb` too (size given), the BLS one encoded images only (size None)."""
    pixels = np.zeros((1, 64, 64, 3), np.uint8)
    sent = {"image": np.array([[b"png"]], dtype=object), "caption": np.array([[b"a red circle"]], dtype=object),
            "return_masks": np.array([[True]])}
    parsed = parse_request(sent.get, 64, 10)
    assert (parsed.encoded, parsed.rgb, parsed.tags, parsed.wants_masks) == (b"png", None, ["red", "circle"], True)
    rgb = parse_request({"image_rgb": pixels, "tags": np.array([[b"Red", b"dog"]], dtype=object)}.get, 64, 10)
    assert rgb.encoded is None and rgb.rgb.shape == (64, 64, 3) and rgb.tags == ["red", "dog"] and not rgb.wants_masks
    with pytest.raises(InputError, match="send one image: encoded bytes as 'image' or uint8 RGB as 'image_rgb', not b"):
        parse_request({**sent, "image_rgb": pixels}.get, 64, 10)
    with pytest.raises(InputError, match=r"^input 'image' is missing: send one image, as encoded bytes \('image'\) or "
                                         r"as uint8 RGB at the model's size \('image_rgb'\)$"):
        parse_request({"caption": sent["caption"]}.get, 64, 10)
    with pytest.raises(InputError, match=r"^input 'image' is missing: send one image, as encoded bytes \('image'\)$"):
        parse_request({"image_rgb": pixels, "caption": sent["caption"]}.get, None, 10)  # BLS: no image_rgb input
    with pytest.raises(InputError, match="image of 3 bytes exceeds the limit of 2"):
        parse_request(sent.get, None, 10, max_image_bytes=2)


def test_one_answer_builder_for_every_served_tagger():
    arrays = dict(answer_arrays(["red", "circle", "dog"], np.array([0.9, 0.2, 0.7], np.float64), {"red", "dog"}, None))
    assert list(arrays) == ["tags", "scores", "selected"]
    assert arrays["tags"].tolist() == [[b"red", b"circle", b"dog"]]
    assert arrays["scores"].dtype == np.float32 and arrays["scores"].tolist() == [[np.float32(0.9), np.float32(0.2),
                                                                                   np.float32(0.7)]]
    assert arrays["selected"].dtype == np.bool_ and arrays["selected"].tolist() == [[True, False, True]]
    masks = dict(answer_arrays(["red"], np.ones(1), ["red"], np.ones((1, 8, 8))))["masks"]
    assert masks.shape == (1, 1, 8, 8) and masks.dtype == np.float32


def test_a_request_of_several_images_is_read_row_by_row_and_answered_padded():
    """The fused tagger's several-image requests (what the front's coalescing sends): one reader
    per image with that image's inputs, and one answer stacking theirs, padded to the longest
    tag list; a one-image request is read and answered as before."""
    sent = {"image": np.array([[b"a"], [b"b"]], dtype=object), "caption": np.array([[b"red dog"], [b"blue sky"]], dtype=object)}
    rows = request_rows(sent.get)
    assert [r("image").tolist() for r in rows] == [[[b"a"]], [[b"b"]]]
    assert [r("caption").tolist() for r in rows] == [[[b"red dog"]], [[b"blue sky"]]] and rows[1]("tags") is None
    one = {"image": np.array([[b"a"]], dtype=object)}
    assert len(request_rows(one.get)) == 1 and request_rows(one.get)[0]("image") is one["image"]
    with pytest.raises(InputError, match="input 'caption' has a batch of 1, the image input 2"):
        request_rows({**sent, "caption": sent["caption"][:1]}.get)
    first = answer_arrays(["red", "dog"], np.array([0.9, 0.1]), ["red"], np.ones((2, 3, 3)))
    second = answer_arrays(["sky"], np.array([0.8]), ["sky"], np.full((1, 3, 3), 2.0))
    stacked = dict(stacked_answer([first, second]))
    assert stacked["tags"].tolist() == [[b"red", b"dog"], [b"sky", b""]]
    assert stacked["scores"].dtype == np.float32 and stacked["scores"].tolist() == [[pytest.approx(0.9), pytest.approx(0.1)],
                                                                                  [pytest.approx(0.8), 0.0]]
    assert stacked["selected"].tolist() == [[True, False], [True, False]]
    assert stacked["masks"].shape == (2, 2, 3, 3) and stacked["masks"][1, 1].max() == 0 and stacked["masks"][1, 0].min() == 2
    assert stacked_answer([first]) is first
