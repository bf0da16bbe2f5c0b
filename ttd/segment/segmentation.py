"""Caption masks and open-vocabulary semantic segmentation (docs/architecture.md §3.5), in the image's own
geometry, on any runtime backend.

Both tasks are the runtime Tagger's tag-head maps over the whole image (ttd/segment/whole_image.py):
- caption mask: (image, caption) -> the caption's candidate tags with their scores and selection
  (as `ttd tag` gives them), a mask per selected tag, and the caption mask M_c ≥ θ, where M_c is
  the tag head with the caption's own embedding as the one "tag";
- semantic segmentation: (image, class names) -> a label map: a constant background channel θ
  is prepended to the class masks and the argmax taken; classes are embedded through the
  prompt-template ensemble (the model's templates, or the user's), optionally refined by PAMR.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ttd.errors import InputError
from ttd.runtime.tagger import Tagger
from ttd.model.tags import candidate_tags
from ttd.segment.whole_image import (ScoreMaps, WindowFeatures, encode_windows, refine_maps, score_maps,
                                     score_maps_of)


@dataclass(frozen=True)
class SegmentOptions:
    """How an image is covered and masks are cut."""

    crop: str = "whole"  # or "center": one centre window, the fast path of `ttd tag`
    scales: tuple[float, ...] = (1.0,)  # shorter side = scale × the model's input size
    stride: int | None = None  # window stride in pixels of the resized image (default: 2/3 of a window)
    mask_threshold: float = 0.5  # θ: a pixel is in a mask when M ≥ θ (and background below θ)
    pamr: bool = False  # refine semantic segmentation maps with PAMR
    batch_size: int = 16  # windows per image-encoder call


@dataclass
class Segment:
    """One binary mask in the image's geometry."""

    label: str
    kind: str  # "caption", "tag" or "class"
    score: float  # the tag's pixel-tag score; for a caption mask its mean M_c inside the mask
    mask: np.ndarray  # bool [H, W]


@dataclass
class Segmentation:
    width: int
    height: int
    candidates: list[tuple[str, float]]  # (tag or class, score)
    selected: list[str]
    segments: list[Segment]
    label_map: np.ndarray | None = None  # uint16 [H, W]: 0 background, i = classes[i - 1]
    classes: list[str] | None = None


def with_templates(tagger: Tagger, templates: tuple[str, ...] | None) -> Tagger:
    """The tagger, or one on the same backend whose tags go through other prompt templates."""
    if not templates:
        return tagger
    config = dataclasses.replace(tagger.config, prompt_templates=tuple(templates))
    config.check()  # every template must hold one {} for the tag
    return Tagger(tagger.backend, config, tagger.threshold, tagger.flip_tta, tagger.score_method,
                  tagger.mask_weight, tagger.mask_bias)


def read_templates(text: str) -> tuple[str, ...]:
    """Prompt templates, one a line ('a photo of a {}.'); blank lines and # comments ignored."""
    lines = [line.strip() for line in text.splitlines()]
    return tuple(line for line in lines if line and not line.startswith("#"))


def encode(tagger: Tagger, image: Image.Image, options: SegmentOptions) -> WindowFeatures:
    return encode_windows(tagger, image, options.crop, options.scales, options.stride, options.batch_size)


def segment_caption(tagger: Tagger, image: Image.Image, caption: str, options: SegmentOptions = SegmentOptions(),
                    features: WindowFeatures | None = None, caption_embed: np.ndarray | None = None) -> Segmentation:
    """Caption tagging over the whole image with the masks of the selected tags and the caption
    (`caption_embed` [D]: the caption's text embedding, if encoded already, e.g. with a batch's)."""
    tags = candidate_tags(caption)
    if not tags:
        raise InputError(f"caption {caption!r} has no candidate tags (only stopwords or punctuation)")
    features = features or encode(tagger, image, options)
    return segment_captions(tagger, [features], [caption], options,
                            None if caption_embed is None else caption_embed[None])[0]


def segment_captions(tagger: Tagger, features: list[WindowFeatures], captions: list[str],
                     options: SegmentOptions = SegmentOptions(),
                     encode_captions: Callable[[list[str]], np.ndarray] | None = None) -> list[Segmentation | str]:
    """`segment_caption` of a batch of encoded images: the captions text-encoded together, the tag
    head run over every window of every image in one request for the tags and one for the captions
    (ttd.segment.whole_image.score_maps_of), and only the masks the record holds (the caption's and
    the selected tags') built at the image's size. An image whose caption has no candidate tags
    gets the error message instead. `encode_captions`: how captions become embeddings (default
    `tagger.encode_texts`; a job's ttd.runtime.texts_ahead.TextsAhead.embeddings gives the same)."""
    tag_lists = [candidate_tags(caption) for caption in captions]
    usable = [n for n, tags in enumerate(tag_lists) if tags]
    results: list[Segmentation | str] = [f"caption {caption!r} has no candidate tags (only stopwords or punctuation)"
                                         for caption in captions]
    if not usable:
        return results
    caption_embeds = (encode_captions or tagger.encode_texts)([captions[n] for n in usable])
    chosen = [features[n] for n in usable]
    tag_maps = score_maps_of(tagger, chosen, [tag_lists[n] for n in usable],
                             [tagger.encode_tags(tag_lists[n]) for n in usable])
    caption_maps = score_maps_of(tagger, chosen, [["caption"]] * len(usable), [e[None] for e in caption_embeds])
    for n, tags, caption_map in zip(usable, tag_maps, caption_maps):
        caption = captions[n]
        candidates = [(t, float(s)) for t, s in zip(tags.tags, tags.scores)]
        selected = [t for t, s in candidates if s >= tagger.threshold]
        caption_probability = caption_map.probabilities(0)
        caption_mask = caption_probability >= options.mask_threshold
        segments = [Segment(caption, "caption",
                            float(caption_probability[caption_mask].mean()) if caption_mask.any() else 0.0,
                            caption_mask)]
        chosen_tags = [k for k, (tag, _) in enumerate(candidates) if tag in selected]
        masks = tags.binary_masks(chosen_tags, options.mask_threshold)  # the record's masks, made together
        segments += [Segment(candidates[k][0], "tag", candidates[k][1], mask) for k, mask in zip(chosen_tags, masks)]
        results[n] = Segmentation(features[n].width, features[n].height, candidates, selected, segments)
    return results


def class_maps(tagger: Tagger, features: WindowFeatures, classes: list[str], options: SegmentOptions,
               class_embeds: np.ndarray | None = None) -> ScoreMaps:
    """The class maps of semantic segmentation (PAMR-refined if asked)."""
    if not classes:
        raise InputError("give at least one class name")
    embeds = tagger.encode_tags(classes) if class_embeds is None else class_embeds
    maps = score_maps(tagger, features, classes, embeds)
    return refine_maps(maps, features.canvas_image) if options.pamr else maps


def segment_classes(tagger: Tagger, image: Image.Image | None, classes: list[str],
                    options: SegmentOptions = SegmentOptions(), class_embeds: np.ndarray | None = None,
                    features: WindowFeatures | None = None) -> Segmentation:
    """Open-vocabulary semantic segmentation: the label map and a mask per class it contains
    (`image` may be None when its `features` are given)."""
    if features is None:
        if image is None:
            raise ValueError("segment_classes needs the image or its features")
        features = encode(tagger, image, options)
    maps = class_maps(tagger, features, classes, options, class_embeds)
    labels = maps.label_map(options.mask_threshold)
    candidates = [(c, float(s)) for c, s in zip(classes, maps.scores)]
    present = np.unique(labels)
    segments = [Segment(classes[i - 1], "class", candidates[i - 1][1], labels == i) for i in present if i > 0]
    return Segmentation(features.width, features.height, candidates, [s.label for s in segments], segments,
                        labels, list(classes))
