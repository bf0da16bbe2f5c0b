"""The Tagger: preprocessing, tokenisation, prompt ensembles, flip TTA and selection around any
backend that runs the three contract graphs (encode_images, encode_texts, score_tags).

Backends differ only in how they run the graphs, so `ttd tag`, evaluation, benchmarks and the
Triton tagger all share this code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ttd.model.config import DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD, SCORE_METHODS, ModelConfig
from ttd.model.contract import ImageEmbeddings, TagHeadOutputs
from ttd.runtime.images import Preprocess, normalize
from ttd.model.negatives import negative_logits_from_probs, sigmoid
from ttd.model.tokenizer import build_tokenizer

TEXT_BATCH = 256
HEAD_ELEMENTS = 1 << 24  # map elements (B·K·h·w) per tag-head call: 64 MB per float32 output
MAX_CACHED_TAGS = 200_000  # ~400 MB at D = 512; the cache restarts when a corpus has more distinct tags


class Backend(Protocol):
    name: str

    def encode_images(self, pixel_values: np.ndarray) -> ImageEmbeddings: ...

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray: ...

    def score_tags(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray) -> TagHeadOutputs: ...


@dataclass
class TagResult:
    tags: list[str]
    scores: np.ndarray  # [K]
    selected: list[str]
    masks: np.ndarray  # [K, h, w] sigmoid masks M_k


def _unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class Tagger:
    def __init__(self, backend: Backend, config: ModelConfig, threshold: float = DEFAULT_THRESHOLD, flip_tta: bool = False,
                 score_method: str = DEFAULT_SCORE_METHOD, mask_weight: float | None = None,
                 mask_bias: float | None = None) -> None:
        if score_method not in SCORE_METHODS:
            raise ValueError(f"unknown score method {score_method!r}; choose one of {', '.join(SCORE_METHODS)}")
        self.backend, self.config = backend, config
        self.threshold, self.flip_tta, self.score_method = threshold, flip_tta, score_method
        self.mask_weight = config.mask_weight_init if mask_weight is None else mask_weight
        self.mask_bias = config.mask_bias_init if mask_bias is None else mask_bias
        self.tokenizer = build_tokenizer(config.tokenizer, config.context_length)
        self.preprocess = Preprocess.for_model(config)
        self._tag_cache: dict[str, np.ndarray] = {}

    def prepare(self, sources: list, names: list[str] | None = None) -> np.ndarray:
        """Files, encoded bytes, PIL images or RGB arrays -> the uint8 batch [B, S, S, 3] that
        `tag` takes, with this model's preprocessing (ImageError names a source that fails)."""
        names = names or [None] * len(sources)
        if not sources:
            return np.zeros((0, self.preprocess.size, self.preprocess.size, 3), np.uint8)
        return np.stack([self.preprocess(s, n) for s, n in zip(sources, names, strict=True)])

    def encode_texts(self, texts: list[str], progress: bool = False) -> np.ndarray:
        starts = range(0, len(texts), TEXT_BATCH)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="encode tags", unit="batch")
        chunks = [self.backend.encode_texts(self.tokenizer(texts[i : i + TEXT_BATCH])) for i in starts]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.config.embed_dim), np.float32)

    def encode_tags(self, tags: list[str], progress: bool = False) -> np.ndarray:
        """Prompt-ensemble embeddings [K, D]; each tag is encoded once per Tagger (cached)."""
        missing = [t for t in dict.fromkeys(tags) if t not in self._tag_cache]
        if len(self._tag_cache) + len(missing) > MAX_CACHED_TAGS:
            self._tag_cache.clear()
            missing = list(dict.fromkeys(tags))
        if missing:
            templates = self.config.prompt_templates
            embeds = self.encode_texts([tpl.format(t) for t in missing for tpl in templates], progress)
            embeds = _unit(_unit(embeds).reshape(len(missing), len(templates), -1).mean(axis=1))
            self._tag_cache.update(zip(missing, embeds))
        return np.stack([self._tag_cache[t] for t in tags]) if tags else np.zeros((0, self.config.embed_dim), np.float32)

    def encode_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """uint8 [B, S, S, 3] -> (image_embeds, patch_embeds, patch_embeds of the flipped images or None).

        A backend with `encode_uint8_images` normalises on its device (a GPU gets a quarter of
        the bytes and the host skips the float conversion); the others get `pixel_values`."""
        batch = np.concatenate([images, images[:, :, ::-1]]) if self.flip_tta else images
        on_device = getattr(self.backend, "encode_uint8_images", None)
        if on_device is not None:
            image_embeds, patch_embeds = on_device(batch, self.config.mean, self.config.std)
        else:
            image_embeds, patch_embeds = self.backend.encode_images(normalize(batch, self.config.mean, self.config.std))
        if not self.flip_tta:
            return image_embeds, patch_embeds, None
        n = len(images)
        return image_embeds[:n], patch_embeds[:n], patch_embeds[n:]

    def score(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray, flipped: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [K], masks [K, h, w]) of one image's tags, with the chosen normalisation."""
        scores, masks = self.score_batch(patch_embeds[None], tag_embeds[None], None if flipped is None else flipped[None])
        return scores[0], masks[0]

    def score_batch(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray,
                    flipped: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, K], masks [B, K, h, w]) of B images with K tags each, with the chosen score."""
        scores, masks = self.score_methods(patch_embeds, tag_embeds, flipped, (self.score_method,))
        return scores[self.score_method], masks

    def score_methods(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray, flipped: np.ndarray | None,
                      methods: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({method: scores [B, K]}, masks [B, K, h, w]): every named score from the same tag-head
        calls (evaluation compares them), each call at most HEAD_ELEMENTS map elements (one call
        per batch is what keeps a GPU busy)."""
        batch, tags = tag_embeds.shape[:2]
        per_image = max(1, tags * patch_embeds.shape[2] * patch_embeds.shape[3])
        step = max(1, HEAD_ELEMENTS // per_image)
        parts = [self._score_chunk(patch_embeds[i : i + step], tag_embeds[i : i + step],
                                   None if flipped is None else flipped[i : i + step], methods)
                 for i in range(0, batch, step)]
        return {m: np.concatenate([p[0][m] for p in parts]) for m in methods}, np.concatenate([p[1] for p in parts])

    def _score_chunk(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray, flipped: np.ndarray | None,
                     methods: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        views = self._views(patch_embeds, flipped)
        scores = {}
        if "negatives" in methods:
            scores["negatives"], masks = self._negatives_chunk(views, tag_embeds)
            if methods == ("negatives",):
                return scores, masks
        outputs = [self._head(v, tag_embeds) for v in views]
        masks = np.mean([o.tag_masks for o in outputs], axis=0) if len(views) > 1 else outputs[0].tag_masks
        for method in methods:
            if method == "negatives":
                continue
            if method == "softmax":
                scores[method] = (np.mean([o.tag_probs for o in outputs], axis=0).max(axis=(2, 3)) if len(views) > 1
                                  else outputs[0].tag_scores)
            elif method == "sigmoid":
                scores[method] = masks.max(axis=(2, 3))
            else:  # minmax of the best-pixel cosine, recovered from the monotonic masks; with flip TTA
                # the views' cosine maps are averaged (as ttd.model.scoring does), not their sigmoid masks
                cos = np.mean([self.mask_cosines(o.tag_masks) for o in outputs], axis=0).max(axis=(2, 3))
                low, span = cos.min(axis=1, keepdims=True), np.ptp(cos, axis=1, keepdims=True)
                scores[method] = np.where(span > 0, (cos - low) / np.where(span > 0, span, 1), 1.0)
            scores[method] = scores[method].astype(np.float32)
        return scores, masks

    @staticmethod
    def _views(patch_embeds: np.ndarray, flipped: np.ndarray | None) -> list[np.ndarray]:
        """The patch embeddings of each view, the flipped one mirrored back onto the image."""
        return [patch_embeds] + ([np.ascontiguousarray(flipped[..., ::-1])] if flipped is not None else [])

    def _negatives_chunk(self, views: list[np.ndarray], tag_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(`negatives` scores [B, K], masks [B, K, h, w]); flip TTA averages the views' N maps."""
        logits, masks = self._negative_logit_views(views, tag_embeds)
        maps = np.mean([sigmoid(view - self.config.negative_margin) for view in logits], axis=0)
        return maps.max(axis=(2, 3)).astype(np.float32), masks

    def negative_logits(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray,
                        flipped: np.ndarray | None) -> np.ndarray:
        """The margin-free logits ℓ [V, B, K, h, w] of the `negatives` score, one map per view
        (flipped ones mirrored back): N = sigmoid(ℓ − negative_margin). What calibration fits."""
        views = self._views(patch_embeds, flipped)
        return np.stack(self._negative_logit_views(views, tag_embeds)[0])

    def _negative_logit_views(self, views: list[np.ndarray], tag_embeds: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """(ℓ of each view [B, K, h, w], masks [B, K, h, w]): one head call per view over the tags
        followed by the model's negative prompts; ℓ comes from its `tag_probs` (ttd/model/negatives.py),
        so every backend serves the score through the existing graph."""
        batch, tags = tag_embeds.shape[:2]
        negatives = self.encode_tags(list(self.config.negative_prompts))
        extended = np.concatenate([tag_embeds, np.broadcast_to(negatives, (batch, *negatives.shape))], axis=1)
        outputs = [self._head(v, np.ascontiguousarray(extended, tag_embeds.dtype)) for v in views]
        masks = np.mean([o.tag_masks[:, :tags] for o in outputs], axis=0)
        return [negative_logits_from_probs(o.tag_probs, tags) for o in outputs], masks

    def _head(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray) -> TagHeadOutputs:
        """The backend's tag head, its result named (a backend that returns a plain tuple in the
        contract's order works too)."""
        return TagHeadOutputs(*self.backend.score_tags(patch_embeds, tag_embeds))

    def mask_cosines(self, masks: np.ndarray) -> np.ndarray:
        """cos(f_i, e) from M = sigmoid(w·cos + b): the inverse of the monotonic mask (float64)."""
        peak = np.clip(masks.astype(np.float64), 1e-7, 1 - 1e-7)
        return (np.log(peak / (1 - peak)) - self.mask_bias) / self.mask_weight

    def tag(self, images: np.ndarray, tag_lists: list[list[str]]) -> list[TagResult]:
        """Tag a batch: images uint8 [B, S, S, 3] (already at the model's size), one tag list each.

        One tag-head call for the batch: each list is padded to the longest with copies of its
        own first tag, which is exact for every score but the softmax (a copy changes no other
        tag's negatives or sigmoid score, nor a row's min or max). Under the softmax, which
        compares a caption's tags with each other, images with the same number of tags share a
        call instead, as do lists longer than a backend's head limit (`max_head_tags`: a TensorRT
        profile), so that one long caption does not take the whole batch off the engine."""
        _, patch_embeds, flipped = self.encode_images(images)
        limit = getattr(self.backend, "max_head_tags", None)
        if limit is not None and self.score_method == "negatives":
            limit -= len(self.config.negative_prompts)
        groups: dict[int, list[int]] = {}
        for i, tags in enumerate(tag_lists):
            alone = self.score_method == "softmax" or not tags or (limit is not None and len(tags) > limit)
            groups.setdefault(len(tags) if alone else -1, []).append(i)
        results: list[TagResult | None] = [None] * len(tag_lists)
        for members in groups.values():
            width = max(len(tag_lists[i]) for i in members)
            tag_embeds = np.stack([self.padded_tag_embeds(tag_lists[i], width) for i in members])
            # one group of every image (vocabulary mode, or a padded batch): no copy of the patch embeddings
            rows = slice(None) if len(members) == len(tag_lists) else members
            scores, masks = self.score_batch(patch_embeds[rows], tag_embeds, None if flipped is None else flipped[rows])
            for row, i in enumerate(members):
                tags = tag_lists[i]
                row_scores = scores[row, : len(tags)]
                selected = [t for t, s in zip(tags, row_scores) if s >= self.threshold]
                results[i] = TagResult(list(tags), row_scores, selected, masks[row, : len(tags)])
        return results

    def padded_tag_embeds(self, tags: list[str], width: int) -> np.ndarray:
        """[width, D]: the tags' embeddings followed by copies of the first one."""
        embeds = self.encode_tags(tags)
        return embeds if len(tags) == width else np.concatenate([embeds, np.repeat(embeds[:1], width - len(tags), 0)])
