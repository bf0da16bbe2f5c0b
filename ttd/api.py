"""The library's front door: `ttd.load(...)` gives a `Tagger` that tags, tags against a
vocabulary and segments images given as paths, bytes, PIL images or RGB arrays.

>>> import ttd
>>> tagger = ttd.load()                       # the embedded default model, as `ttd tag` picks it
>>> result = tagger.tag("examples/world/images/010000.png", "the beautiful orange heart near a orange circle")
>>> result.selected
['orange', 'heart', 'circle']

Every default is the one `ttd tag` uses (both come from ttd/options.py), and the scores and
selections are the ones `ttd tag` writes for the same inputs: the same preprocessing, runtime
and scoring function run underneath.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, overload

import numpy as np
from PIL import Image

from ttd.errors import InputError
from ttd.model.config import ModelConfig
from ttd.model.tags import tags_of_caption
from ttd.model.config import DEFAULT_MASK_THRESHOLD, DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD
from ttd.options import DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_THREADS, checked_settings
from ttd.runtime.images import ImageError, decode_image
from ttd.segment.segmentation import Segmentation

if TYPE_CHECKING:
    from ttd.runtime.auto_choice import FastPath
    from ttd.runtime.tagger import Tagger as RuntimeTagger

Mask = np.ndarray[Any, np.dtype[np.bool_]]
Images = Union[list["ImageInput"], tuple["ImageInput", ...]]
Texts = Union[list[str], tuple[str, ...]]
ImageInput = Union[str, Path, bytes, Image.Image, "np.ndarray[Any, Any]"]
"""An image: a file path, encoded bytes (PNG, JPEG, ...), a PIL image or an H×W×3 uint8 RGB array."""

BATCH_SIZE = 32  # images per encoder call, as `ttd tag`'s default batch


@dataclass(frozen=True)
class TagResult:
    """The tags of one image: `selected` in candidate order, every candidate's `scores`, and with
    `masks=True` a bool H×W mask per selected tag in the image's own geometry."""

    selected: list[str]
    scores: dict[str, float]
    masks: dict[str, Mask] | None = field(default=None, repr=False)


def _label(image: ImageInput, position: int) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    kind = {bytes: "bytes", np.ndarray: "array"}.get(type(image), "PIL image")
    return f"image {position} ({kind})"


def _pil(image: ImageInput, label: str) -> Image.Image | bytes | str | Path:
    """What the preprocessing takes: a checked array becomes a PIL image; anything else is passed on."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"{label}: an array image must be H×W×3 uint8 RGB, got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path, bytes)):
        return image
    raise ImageError(f"{label}: {type(image).__name__} is not an image (give a path, bytes, a PIL image or an "
                     "H×W×3 uint8 array)")


def _as_list(images: ImageInput | Images) -> tuple[list[ImageInput], bool]:
    """(the images, whether one image was given rather than a list)."""
    if isinstance(images, (list, tuple)):
        return list(images), False
    return [images], True


class Tagger:
    """A model on a backend, with its selection settings: what `ttd.load` returns.

    `runtime` is the batch-level runtime Tagger (preprocessed uint8 batches, tag embeddings) that
    the job runner, evaluation and serving use."""

    def __init__(self, runtime: RuntimeTagger, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                 auto_choice: FastPath | None = None) -> None:
        if not 0 < mask_threshold < 1:
            raise InputError(f"mask_threshold {mask_threshold!r} must lie strictly between 0 and 1")
        self.runtime = runtime
        self.mask_threshold = mask_threshold
        self.auto_choice = auto_choice  # what backend="auto" / dtype="auto" picked, and why

    @property
    def config(self) -> ModelConfig:
        return self.runtime.config

    @property
    def threshold(self) -> float:
        return self.runtime.threshold

    @property
    def score_method(self) -> str:
        return self.runtime.score_method

    @property
    def backend(self) -> str:
        return str(getattr(self.runtime.backend, "name", type(self.runtime.backend).__name__))

    def __repr__(self) -> str:
        return (f"ttd.Tagger({self.config.source!r}, backend={self.backend!r}, score={self.score_method!r}, "
                f"threshold={self.threshold:g})")

    @overload
    def tag(self, images: Images, captions: Texts, masks: bool = ...) -> list[TagResult]: ...

    @overload
    def tag(self, images: ImageInput, captions: str, masks: bool = ...) -> TagResult: ...

    def tag(self, images: ImageInput | Images, captions: str | Texts,
            masks: bool = False) -> TagResult | list[TagResult]:
        """Select the tags of each image's caption: one image and caption, or lists of equal length.

        >>> tagger = ttd.load()
        >>> [r.selected for r in tagger.tag(["examples/world/images/010002.png"] * 2, ["a yellow square", "a car"])]
        [['yellow', 'square'], []]
        """
        batch, single = _as_list(images)
        texts = [captions] if isinstance(captions, str) else list(captions)
        if len(texts) != len(batch):
            raise InputError(f"{len(batch)} images but {len(texts)} captions: give one caption per image")
        tag_lists = []
        for position, text in enumerate(texts):
            try:
                tag_lists.append(tags_of_caption(text))
            except ValueError as error:
                raise InputError(f"caption {position}: {error}") from None
        results = self._tag(batch, tag_lists, None, masks)
        return results[0] if single else results

    @overload
    def tag_vocabulary(self, images: Images, tags: Sequence[str], masks: bool = ...) -> list[TagResult]: ...

    @overload
    def tag_vocabulary(self, images: ImageInput, tags: Sequence[str], masks: bool = ...) -> TagResult: ...

    def tag_vocabulary(self, images: ImageInput | Images, tags: Sequence[str],
                       masks: bool = False) -> TagResult | list[TagResult]:
        """Which of `tags` each image shows (the vocabulary is encoded once per Tagger)."""
        if isinstance(tags, str):
            raise InputError(f"tags: give a list of tags, not one string ({tags!r}: write [{tags!r}])")
        vocabulary = [t.strip().lower() for t in tags if t.strip()]
        if not vocabulary:
            raise InputError("give at least one tag")
        batch, single = _as_list(images)
        results = self._tag(batch, [vocabulary] * len(batch), self.runtime.encode_tags(vocabulary), masks)
        return results[0] if single else results

    def _tag(self, batch: list[ImageInput], tag_lists: list[list[str]], vocabulary_embeds: np.ndarray[Any, Any] | None,
             masks: bool) -> list[TagResult]:
        from ttd.segment.masks import boolean_mask

        runtime, results = self.runtime, []
        for start in range(0, len(batch), BATCH_SIZE):
            chunk = batch[start : start + BATCH_SIZE]
            labels = [_label(image, start + n) for n, image in enumerate(chunk)]
            prepared = [runtime.preprocess.with_size(_pil(image, label), label) for image, label in zip(chunk, labels)]
            arrays = np.stack([array for array, _ in prepared])
            lists = tag_lists[start : start + BATCH_SIZE]
            if vocabulary_embeds is None:
                tagged = runtime.tag(arrays, lists, with_masks=masks)
            else:
                tagged = runtime.tag_vocabulary(arrays, lists[0], vocabulary_embeds, with_masks=masks)
            for result, (_, size) in zip(tagged, prepared):
                scores = {tag: float(score) for tag, score in zip(result.tags, result.scores)}
                masks_of = None
                if masks and result.masks is not None:
                    masks_of = {tag: boolean_mask(result.masks[result.tags.index(tag)], runtime.config.image_size,
                                                  size, self.mask_threshold) for tag in result.selected}
                results.append(TagResult(list(result.selected), scores, masks_of))
        return results

    @overload
    def segment(self, images: Images, captions: Texts | None = ...,
                classes: Sequence[str] | None = ..., *, crop: str = ..., scales: Sequence[float] = ...,
                stride: int | None = ..., pamr: bool = ...) -> list[Segmentation]: ...

    @overload
    def segment(self, images: ImageInput, captions: str | None = ..., classes: Sequence[str] | None = ..., *,
                crop: str = ..., scales: Sequence[float] = ..., stride: int | None = ...,
                pamr: bool = ...) -> Segmentation: ...

    def segment(self, images: ImageInput | Images, captions: str | Texts | None = None,
                classes: Sequence[str] | None = None, *, crop: str = "whole", scales: Sequence[float] = (1.0,),
                stride: int | None = None, pamr: bool = False) -> Segmentation | list[Segmentation]:
        """Masks in each image's own geometry, as `ttd segment`: a caption's mask and its selected
        tags' masks (`captions`), or open-vocabulary semantic segmentation into `classes` (a label
        map with background where no class reaches the mask threshold)."""
        from ttd.segment.segmentation import SegmentOptions, segment_caption, segment_classes

        if (captions is None) == (classes is None):
            raise InputError("give captions (caption masks) or classes (semantic segmentation), exactly one")
        if crop not in ("whole", "center"):
            raise InputError(f"crop {crop!r}: choose whole or center")
        options = SegmentOptions(crop=crop, scales=tuple(float(s) for s in scales), stride=stride,
                                 mask_threshold=self.mask_threshold, pamr=pamr)
        batch, single = _as_list(images)
        texts: list[str] = []
        if captions is not None:
            texts = [captions] if isinstance(captions, str) else list(captions)
            if len(texts) != len(batch):
                raise InputError(f"{len(batch)} images but {len(texts)} captions: give one caption per image")
        names = [c.strip() for c in classes or () if c.strip()]
        if classes is not None and not names:
            raise InputError("give at least one class name")
        results = []
        for position, image in enumerate(batch):
            label = _label(image, position)
            source = _pil(image, label)
            decoded = source if isinstance(source, Image.Image) else decode_image(source, label)
            try:
                results.append(segment_classes(self.runtime, decoded, names, options) if classes is not None
                               else segment_caption(self.runtime, decoded, texts[position], options))
            except ValueError as error:
                if isinstance(error, InputError):
                    raise
                raise InputError(f"{label}: {error}") from None
        return results[0] if single else results


def load(
    checkpoint: str | Path | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    backend: str = DEFAULT_BACKEND,
    export_dir: str | Path | None = None,
    device: str = DEFAULT_DEVICE,
    dtype: str = DEFAULT_DTYPE,
    *,
    dense_mode: str | None = None,
    url: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    score_method: str = DEFAULT_SCORE_METHOD,
    flip_tta: bool = False,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    threads: int = DEFAULT_THREADS,
    compile: bool = False,
    warn_unfitted: bool = True,
) -> Tagger:
    """A Tagger for a model on a backend; with nothing named, the embedded default on torch — the
    model `ttd tag` uses when none is given. Every default is `ttd tag`'s.

    `checkpoint`: a TTD checkpoint (.safetensors with its .json); `model` / `pretrained`: an
    open_clip architecture and its weights (a local file offline); `export_dir`: a `ttd export`
    folder (onnxruntime, tensorrt and triton run it; torch runs its weights). backend="auto" and
    dtype="auto" pick the fastest gated path here (`Tagger.auto_choice` says what and why).
    A model whose margin was never fitted to it warns (`ttd.UnfittedMarginWarning`).

    >>> ttd.load(threshold=0.6).threshold
    0.6
    """
    from ttd.runtime import load_tagger

    checked_settings(checkpoint=checkpoint, dense_mode=dense_mode, backend=backend, export_dir=export_dir,
                     dtype=dtype, threads=threads, threshold=threshold, score_method=score_method,
                     mask_threshold=mask_threshold)
    choice = None
    if "auto" in (backend, dtype):
        from ttd.runtime.auto_choice import resolve_auto

        choice = resolve_auto(backend, dtype, device, None if export_dir is None else str(export_dir))
        backend, device = choice.backend, choice.device
        dtype = choice.dtype if choice.backend == "torch" else "fp32"
    runtime = load_tagger(backend, model=model, pretrained=pretrained,
                          checkpoint=None if checkpoint is None else str(checkpoint), dense_mode=dense_mode,
                          device=device, dtype=dtype, export_dir=None if export_dir is None else str(export_dir),
                          url=url, threshold=threshold, flip_tta=flip_tta, score_method=score_method,
                          threads=threads, compile=compile, warn_unfitted=warn_unfitted)
    return Tagger(runtime, mask_threshold, choice)
