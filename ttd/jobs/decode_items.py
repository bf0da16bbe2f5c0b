"""Decoding the items of a tagging job (`ttd tag`), in a worker process: this module and what it
imports must stay free of torch (a decoding worker that imports torch costs seconds of start-up
and hundreds of MB; tests/jobs/test_decoding_pool.py holds it)."""

from __future__ import annotations

import numpy as np

from ttd.data.inputs import Item
from ttd.errors import InputError
from ttd.model.tags import MAX_CAPTION_TAGS, tags_of_caption  # noqa: F401 - MAX_CAPTION_TAGS: where callers find it
from ttd.runtime.images import ImageError, Preprocess, header_size, max_file_bytes, read_image_file


def caption_tags(item: Item) -> list[str]:
    """An item's candidate tags, or the ValueError that names what is wrong with its caption
    (every mode that tags a caption checks it here)."""
    return tags_of_caption(item.caption)


def _prepare(item: Item, vocabulary_mode: bool,
             preprocess: Preprocess) -> tuple[np.ndarray, list[str] | None, tuple[int, int]]:
    """(uint8 image at the model's size, candidate tags (None in vocabulary mode), the image's own (width, height))."""
    if item.error:
        raise InputError(item.error)
    tags = None if vocabulary_mode else caption_tags(item)
    data = getattr(item, "data", None)  # a webdataset sample's bytes (ttd.data.items.ShardItem)
    image, size = preprocess.with_size(item.path if data is None else data, item.image)
    return image, tags, size


def prepare_items(items: list[Item], vocabulary_mode: bool,
                  preprocess: Preprocess) -> list[tuple[np.ndarray, list[str] | None] | str]:
    """Each item decoded and resized, or the error that names its problem (runs in a worker)."""
    outcomes = []
    for item in items:
        try:
            outcomes.append(_prepare(item, vocabulary_mode, preprocess))
        except (ImageError, ValueError, OSError) as error:
            outcomes.append(str(error))
    return outcomes


JPEG_START = b"\xff\xd8\xff"


def jpegs_left_encoded(items: list[Item], vocabulary_mode: bool, preprocess: Preprocess) -> list:
    """`prepare_items` for a job that decodes JPEGs on the device (ttd/jobs/device_decoding.py): a
    JPEG item stays encoded, as (its bytes, tags, upright (width, height)), checked from its
    header alone (size limit, readable); any other item is prepared by PIL here, as usual."""
    outcomes: list = []
    for item in items:
        try:
            if item.error:
                raise InputError(item.error)
            tags = None if vocabulary_mode else caption_tags(item)
            data = getattr(item, "data", None)  # a webdataset sample's bytes (ttd.data.items.ShardItem)
            if data is None:
                data = read_image_file(item.path, item.image, max_file_bytes(preprocess.max_pixels))
            if data[:3] == JPEG_START:
                outcomes.append((data, tags, header_size(data, item.image, preprocess.max_pixels)))
            else:
                image, size = preprocess.with_size(data, item.image)
                outcomes.append((image, tags, size))
        except (ImageError, ValueError, OSError) as error:
            outcomes.append(str(error))
    return outcomes
