"""The served taggers' request checks (ttd/serve/tagger_requests.py), without a server."""

import numpy as np
import pytest

from ttd.errors import InputError
from ttd.serve.tagger_requests import encoded_image, request_tags, rgb_image, texts


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
