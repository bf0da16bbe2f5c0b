"""What a `ttd_tagger` request asks for and what its answer holds, the same for every served
tagger (the fused model and the python flavour's BLS model): the image (encoded bytes, or uint8
RGB already at the model's size), the caption or tag list, whether masks are wanted; and the
answer's `tags`, `scores`, `selected` (and `masks`) arrays. The fused model also takes a request
of several images (a batch axis of N, one image per row: what the front's coalescing sends,
docs/serving.md "Coalescing"): `request_rows` splits it, `stacked_answer` pads the rows' answers
into one. Pure functions of the request's arrays
(no Triton import), so they are tested without a server; a refusal is an InputError (a
ValueError) whose message the client gets with HTTP 400."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TaggerRequest:
    """One checked request: exactly one of `encoded` (image file bytes) and `rgb` (uint8 [S, S, 3])."""

    encoded: bytes | None
    rgb: np.ndarray | None
    tags: list[str]
    wants_masks: bool


def parse_request(read: Callable[[str], np.ndarray | None], size: int | None, max_tags: int,
                  max_image_bytes: int = MAX_IMAGE_BYTES) -> TaggerRequest:
    """The request whose input arrays `read(name)` returns (None: not sent). `size`: the model's
    image size, which an `image_rgb` must have (None: the model takes encoded images only)."""
    encoded, rgb = read("image"), read("image_rgb") if size is not None else None
    if encoded is None and rgb is None:
        raise InputError("input 'image' is missing: send one image, as encoded bytes ('image')"
                         + (" or as uint8 RGB at the model's size ('image_rgb')" if size else ""))
    if encoded is not None and rgb is not None:
        raise InputError("send one image: encoded bytes as 'image' or uint8 RGB as 'image_rgb', not both")
    tags = request_tags(texts(read("caption")), texts(read("tags")), max_tags)
    masks = read("return_masks")
    wants_masks = masks is not None and bool(masks.reshape(-1)[0])
    if encoded is not None:
        return TaggerRequest(encoded_image(encoded, max_image_bytes), None, tags, wants_masks)
    assert rgb is not None and size is not None  # the one image sent (checked above)
    return TaggerRequest(None, rgb_image(rgb, size), tags, wants_masks)


def answer_arrays(tags: list[str], scores: np.ndarray, selected: Collection[str],
                  masks: np.ndarray | None) -> list[tuple[str, np.ndarray]]:
    """The answer's output arrays (name, array with the batch axis of 1): the request's tags, their
    scores, which are selected, and their masks when asked for."""
    chosen = set(selected)
    arrays = [("tags", np.array([t.encode() for t in tags], dtype=np.object_)[None]),
              ("scores", np.asarray(scores, np.float32)[None]),
              ("selected", np.array([t in chosen for t in tags], np.bool_)[None])]
    if masks is not None:
        arrays.append(("masks", np.asarray(masks, np.float32)[None]))
    return arrays


def request_rows(read: Callable[[str], np.ndarray | None]) -> list[Callable[[str], np.ndarray | None]]:
    """One reader per image of a request whose inputs have a batch axis of N (the image input's
    first dimension), each giving that row's inputs with a batch axis of 1, as a one-image request
    sends them. A request without an image is one row (parse_request says what is missing)."""
    arrays: dict[str, np.ndarray | None] = {}

    def whole(name: str) -> np.ndarray | None:
        if name not in arrays:
            arrays[name] = read(name)
        return arrays[name]

    image = next((a for a in (whole("image"), whole("image_rgb")) if a is not None), None)
    count = 1 if image is None or image.ndim == 0 else int(image.shape[0])
    if count == 1:
        return [whole]
    for name in ("image", "image_rgb", "caption", "tags", "return_masks"):
        array = whole(name)
        if array is not None and (array.ndim == 0 or array.shape[0] != count):
            raise InputError(f"input {name!r} has a batch of {array.shape[0] if array.ndim else 0}, the image input {count}")

    def row(k: int) -> Callable[[str], np.ndarray | None]:
        return lambda name: None if (array := whole(name)) is None else array[k : k + 1]

    return [row(k) for k in range(count)]


PADDING = {"tags": b"", "scores": 0.0, "selected": False, "masks": 0.0}  # a tag is never empty (request_tags)


def stacked_answer(rows: list[list[tuple[str, np.ndarray]]]) -> list[tuple[str, np.ndarray]]:
    """The answer of a several-image request: each output's rows (answer_arrays of each image)
    stacked on the batch axis, a row with fewer tags padded at the end (tags b"", scores 0,
    selected False, masks 0); a row's own tags are its tags up to the first empty one. One row is
    returned as it is, so a one-image request is answered exactly as before."""
    if len(rows) == 1:
        return rows[0]
    width = max(dict(row)["tags"].shape[1] for row in rows)
    stacked = []
    for position, (name, first) in enumerate(rows[0]):
        array = np.full((len(rows), width, *first.shape[2:]), PADDING[name], dtype=first.dtype)
        for k, row in enumerate(rows):
            array[k, : row[position][1].shape[1]] = row[position][1][0]
        stacked.append((name, array))
    return stacked
