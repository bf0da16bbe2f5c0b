"""What a backend runs (the three contract graphs) and how a batch of images is tagged with them.

Every backend runs `encode_images`, `encode_texts` and `score_tags` (the tag head: the scoring
function of ttd/model/scoring.py, traced). `tag_images` runs encoder and head together and hands
back only the scores (and the cosine maps when masks are asked for): a backend whose graphs run
on a device (torch on a GPU, TensorRT) keeps the patch embeddings there; the others use
`tag_images_on_host`, which is the same composition on host arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ttd.model.contract import ImageEmbeddings, TagHeadOutputs
from ttd.runtime.images import normalize


@dataclass(frozen=True)
class HeadRequest:
    """The tag inputs of one `tag_images` call, besides the images (leading dim T: B or 1)."""

    tag_embeds: np.ndarray  # [T, K, D] float32
    tag_valid: np.ndarray  # [T, K] bool
    negative_embeds: np.ndarray  # [T, N, D] float32
    negative_margin: np.ndarray  # [T, 1] float32
    with_cosines: bool = False  # hand back the cosine maps too (for masks)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.tag_embeds, self.tag_valid, self.negative_embeds, self.negative_margin


@dataclass(frozen=True)
class ImagePreprocessing:
    """How uint8 images become the encoder's input: the model's normalisation, and flip TTA."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = False


@dataclass
class BatchScores:
    """One batch's results as whole arrays, for records built without a per-tag loop."""

    scores: np.ndarray  # [B, K] float32: the Tagger's chosen score of every tag (padded tags 0)
    top: np.ndarray | None = None  # [B, k'] int64: the highest scores' tag indices, descending (vocabulary mode)
    cosines: np.ndarray | None = None  # [B, K, h, w]: the cosine maps, when masks are asked for
    stages: dict[str, float] | None = None  # seconds per stage of this batch (upload, encode, head, download)


class Pending(Protocol):
    """A batch submitted to a backend; `wait` blocks until its results are on the host."""

    def wait(self) -> BatchScores: ...


@dataclass
class Ready:
    """A batch whose results are already on the host (backends that run synchronously)."""

    result: BatchScores

    def wait(self) -> BatchScores:
        return self.result


class Backend(Protocol):
    name: str

    def encode_images(self, pixel_values: np.ndarray) -> ImageEmbeddings: ...

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray: ...

    def score_tags(self, patch_views: np.ndarray, request: HeadRequest) -> TagHeadOutputs: ...

    def tag_images(self, images: np.ndarray, preprocessing: ImagePreprocessing,
                   request: HeadRequest) -> TagHeadOutputs: ...


def with_flipped(images: np.ndarray, flip: bool) -> np.ndarray:
    """uint8 [B, S, S, 3] -> the batch the encoder runs: the images, then their mirror images under flip TTA."""
    return np.concatenate([images, images[:, :, ::-1]]) if flip else images


def patch_views(patch_embeds: np.ndarray, images: int) -> np.ndarray:
    """The encoder's [V·B, D, h, w] patch embeddings (images, then mirrored images) -> the tag
    head's views [B, V, D, h, w], each mirrored view flipped back onto its image."""
    if len(patch_embeds) == images:
        return patch_embeds[:, None]
    return np.stack([patch_embeds[:images], patch_embeds[images:, ..., ::-1]], axis=1)


def tag_images_on_host(backend: Backend, images: np.ndarray, preprocessing: ImagePreprocessing,
                       request: HeadRequest) -> TagHeadOutputs:
    """`tag_images` for a backend whose graph outputs are host arrays (onnxruntime on a CPU, Triton)."""
    pixels = normalize(with_flipped(images, preprocessing.flip), preprocessing.mean, preprocessing.std)
    _, patch_embeds = backend.encode_images(pixels)
    return backend.score_tags(patch_views(patch_embeds, len(images)), request)
