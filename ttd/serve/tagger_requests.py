"""What a `ttd_tagger` request asks for, checked the same way by every served tagger: the image
(encoded bytes, or uint8 RGB already at the model's size), the caption or tag list, and whether
masks are wanted. Pure functions of the request's arrays (no Triton import), so they are tested
without a server; a refusal is a ValueError whose message the client gets with HTTP 400."""

from __future__ import annotations

import numpy as np

from ttd.errors import InputError
from ttd.model.tags import tags_of_caption

MAX_IMAGE_BYTES = 20 << 20  # as the BLS tagger: room below the front's 64 MiB body bound


def texts(array: np.ndarray | None) -> list[str] | None:
    """A BYTES tensor as strings (None when the input was not sent)."""
    if array is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]


def request_tags(caption: list[str] | None, tags: list[str] | None, max_tags: int) -> list[str]:
    """The request's tags: its tag list (stripped, lower-cased, deduplicated) or its caption's
    candidate tags (the caption check of `ttd tag`), at most `max_tags` of them."""
    if tags:
        chosen = list(dict.fromkeys(t.strip().lower() for t in tags if t.strip()))
    elif caption is not None:
        if len(caption) != 1:
            raise InputError(f"send one caption per request, got {len(caption)}")
        chosen = tags_of_caption(caption[0])
    else:
        raise InputError("send a caption or a list of tags")
    if not chosen:
        raise InputError("the tag list is empty")
    if len(chosen) > max_tags:
        raise InputError(f"{len(chosen)} tags exceed the limit of {max_tags} per request")
    return chosen


def encoded_image(array: np.ndarray, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The one encoded image of a BYTES `image` tensor."""
    images = array.reshape(-1)
    if len(images) != 1:
        raise InputError(f"send exactly one image per request, got {len(images)}")
    data = bytes(images[0])
    if len(data) > max_bytes:
        raise InputError(f"image of {len(data):,} bytes exceeds the limit of {max_bytes:,}")
    return data


def rgb_image(array: np.ndarray, size: int) -> np.ndarray:
    """The one uint8 RGB image [size, size, 3] of an `image_rgb` tensor [1, size, size, 3]."""
    if array.dtype != np.uint8 or array.shape[-3:] != (size, size, 3) or array.size != size * size * 3:
        raise InputError(f"image_rgb must be one uint8 image of shape [{size}, {size}, 3] (the model's input size), "
                         f"got {array.dtype} {list(array.shape)}")
    return array.reshape(size, size, 3)
