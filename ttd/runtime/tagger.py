"""The Tagger: preprocessing, tokenisation, prompt ensembles, flip TTA and selection around any
backend that runs the three contract graphs (encode_images, encode_texts, score_tags).

Backends differ only in how they run the graphs, so `ttd tag`, evaluation, benchmarks and the
Triton tagger all share this code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ttd.images import normalize
from ttd.config import SCORE_METHODS, ModelConfig
from ttd.tokenizer import build_tokenizer

TEXT_BATCH = 256
MAX_CACHED_TAGS = 200_000  # ~400 MB at D = 512; the cache restarts when a corpus has more distinct tags


class Backend(Protocol):
    name: str

    def encode_images(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def encode_texts(self, input_ids: np.ndarray) -> np.ndarray: ...

    def score_tags(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray) -> tuple[np.ndarray, ...]: ...


@dataclass
class TagResult:
    tags: list[str]
    scores: np.ndarray  # [K]
    selected: list[str]
    masks: np.ndarray  # [K, h, w] sigmoid masks M_k


def _unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class Tagger:
    def __init__(self, backend: Backend, config: ModelConfig, threshold: float = 0.5, flip_tta: bool = False,
                 score_method: str = "softmax", mask_weight: float | None = None,
                 mask_bias: float | None = None) -> None:
        if score_method not in SCORE_METHODS:
            raise ValueError(f"unknown score method {score_method!r}; choose one of {', '.join(SCORE_METHODS)}")
        self.backend, self.config = backend, config
        self.threshold, self.flip_tta, self.score_method = threshold, flip_tta, score_method
        self.mask_weight = config.mask_weight_init if mask_weight is None else mask_weight
        self.mask_bias = config.mask_bias_init if mask_bias is None else mask_bias
        self.tokenizer = build_tokenizer(config.tokenizer, config.context_length)
        self._tag_cache: dict[str, np.ndarray] = {}

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
        """uint8 [B, S, S, 3] -> (image_embeds, patch_embeds, patch_embeds of the flipped images or None)."""
        pixels = normalize(images, self.config.mean, self.config.std)
        if not self.flip_tta:
            return *self.backend.encode_images(pixels), None
        both_global, both_patch = self.backend.encode_images(np.concatenate([pixels, pixels[..., ::-1]]))
        n = len(images)
        return both_global[:n], both_patch[:n], both_patch[n:]

    def score(self, patch_embeds: np.ndarray, tag_embeds: np.ndarray, flipped: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [K], masks [K, h, w]) of one image's tags, with the chosen normalisation."""
        views = [patch_embeds[None]] + ([flipped[None, :, :, ::-1].copy()] if flipped is not None else [])
        outputs = [self.backend.score_tags(v, tag_embeds[None]) for v in views]
        probs = np.mean([o[2][0] for o in outputs], axis=0)
        masks = np.mean([o[1][0] for o in outputs], axis=0)
        if self.score_method == "softmax":
            scores = probs.max(axis=(1, 2)) if len(views) > 1 else outputs[0][0][0]
        elif self.score_method == "sigmoid":
            scores = masks.max(axis=(1, 2))
        else:  # minmax of the best-pixel cosine, recovered from the monotonic masks; with flip TTA the two
            # views' cosine maps are averaged (as ttd.scoring does), not their sigmoid masks
            cosine_maps = []
            for output in outputs:
                view = np.clip(output[1][0].astype(np.float64), 1e-7, 1 - 1e-7)
                cosine_maps.append((np.log(view / (1 - view)) - self.mask_bias) / self.mask_weight)
            cos = np.mean(cosine_maps, axis=0).max(axis=(1, 2))
            span = cos.max() - cos.min()
            scores = (cos - cos.min()) / span if span > 0 else np.ones_like(cos)
        return scores.astype(np.float32), masks

    def tag(self, images: np.ndarray, tag_lists: list[list[str]]) -> list[TagResult]:
        """Tag a batch: images uint8 [B, S, S, 3] (already at the model's size), one tag list each."""
        _, patch_embeds, flipped = self.encode_images(images)
        results = []
        for i, tags in enumerate(tag_lists):
            scores, masks = self.score(patch_embeds[i], self.encode_tags(tags), None if flipped is None else flipped[i])
            selected = [t for t, s in zip(tags, scores) if s >= self.threshold]
            results.append(TagResult(list(tags), scores, selected, masks))
        return results
