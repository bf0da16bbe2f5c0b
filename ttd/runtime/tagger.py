"""The Tagger: preprocessing, tokenisation, prompt ensembles, flip TTA and selection around any
backend that runs the three contract graphs (ttd/runtime/backend.py).

Backends differ only in how they run the graphs, so `ttd tag`, evaluation, calibration,
segmentation, benchmarks and the Triton tagger all share this code, and every score comes from
the one scoring function (ttd/model/scoring.py) that the tag head runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ttd.errors import InputError
from ttd.model.config import DEFAULT_SCORE_METHOD, DEFAULT_THRESHOLD, SCORE_METHODS, ModelConfig
from ttd.model.contract import SCORE_ROWS, TagHeadOutputs, score_row
from ttd.model.tokenizer import build_tokenizer
from ttd.runtime.backend import (Backend, BatchScores, HeadRequest, ImagePreprocessing, Pending, Ready, patch_views,
                                 with_flipped)
from ttd.runtime.images import Preprocess, normalize

# Texts go to the text encoder TEXT_ROWS at a time, a short chunk padded with copies of its last
# text: matrix products of another shape take other kernels (a one-row product a GEMV), whose sums
# differ in the last bits, and a text's embedding must not depend on which texts came with it (a
# resumed or sharded job writes the uninterrupted job's bytes).
TEXT_ROWS = 8
# A backend may fix a larger call (its `text_rows`): the torch backend on a GPU encodes 256 texts a
# call, so an open vocabulary of 20,000 caption words is ~230 calls (one host synchronisation
# each), not ~7,500; on a CPU 8 rows a call costs no more per text and pads less.
# A backend whose text encoder takes ids cut after the end-of-text token (`text_prefix`: torch on a
# causal CLIP text tower) gets each text at its own length rounded up to PREFIX_STEP positions:
# a world caption (11 of 32 tokens) or a prompt ("a {}": 4) costs a third of the full context.
# Texts are grouped by that length, so a text's embedding still depends on the text alone.
PREFIX_STEP = 8
HEAD_ELEMENTS = 1 << 24  # map elements (B·V·K·h·w) per tag-head call: bounds the head's working memory
MAX_CACHED_TAGS = 200_000  # ~400 MB at D = 512; the cache restarts when a corpus has more distinct tags


@dataclass
class TagResult:
    tags: list[str]
    scores: np.ndarray  # [K]: the Tagger's score
    selected: list[str]
    masks: np.ndarray | None = None  # [K, h, w] sigmoid masks M_k, when asked for


def _unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function without overflow warnings for large negative logits."""
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


class Tagger:
    def __init__(self, backend: Backend, config: ModelConfig, threshold: float = DEFAULT_THRESHOLD, flip_tta: bool = False,
                 score_method: str = DEFAULT_SCORE_METHOD, mask_weight: float | None = None,
                 mask_bias: float | None = None) -> None:
        if score_method not in SCORE_METHODS:
            raise InputError(f"unknown score {score_method!r}; choose one of {', '.join(SCORE_METHODS)}")
        self.backend, self.config = backend, config
        self.threshold, self.flip_tta, self.score_method = threshold, flip_tta, score_method
        self.mask_weight = config.mask_weight_init if mask_weight is None else mask_weight
        self.mask_bias = config.mask_bias_init if mask_bias is None else mask_bias
        self.tokenizer = build_tokenizer(config.tokenizer, config.context_length)
        self.preprocess = Preprocess.for_model(config)
        self.preprocessing = ImagePreprocessing(tuple(config.mean), tuple(config.std), flip_tta)
        self.text_rows = int(getattr(backend, "text_rows", TEXT_ROWS))  # fixed per Tagger (see TEXT_ROWS)
        self._tag_cache: dict[str, np.ndarray] = {}
        self._negatives: np.ndarray | None = None

    def prepare(self, sources: list, names: list[str] | None = None) -> np.ndarray:
        """Files, encoded bytes, PIL images or RGB arrays -> the uint8 batch [B, S, S, 3] that
        `tag` takes, with this model's preprocessing (ImageError names a source that fails)."""
        names = names or [None] * len(sources)
        if not sources:
            return np.zeros((0, self.preprocess.size, self.preprocess.size, 3), np.uint8)
        return np.stack([self.preprocess(s, n) for s, n in zip(sources, names, strict=True)])

    def encode_texts(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Text embeddings [T, D], always `text_rows` texts per backend call (see TEXT_ROWS), each
        call of texts of one length bucket when the backend takes cut ids (see PREFIX_STEP)."""
        return self.encode_texts_filled(texts, (), progress)[0]

    def encode_texts_filled(self, texts: Sequence[str], spare: Sequence[str],
                            progress: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`encode_texts`, the padding rows of a short call taken by `spare` texts of its length
        bucket (texts needed soon; see ttd/runtime/texts_ahead.py): their embeddings come back too,
        at no extra call. A text's embedding is the same whichever texts share its call."""
        if not texts:
            return np.zeros((0, self.config.embed_dim), np.float32), {}
        count = len(texts)
        ids = self.tokenizer([*texts, *spare])
        lengths = np.full(len(ids), ids.shape[1])
        if getattr(self.backend, "text_prefix", False):
            last = (ids != 0)[:, ::-1].argmax(axis=1)
            lengths = np.minimum(ids.shape[1], -(-(ids.shape[1] - last) // PREFIX_STEP) * PREFIX_STEP)
        rows = self.text_rows
        calls = []  # (rows of `ids`: its own texts first, then spare ones; cut length; how many are its own)
        for length in np.unique(lengths[:count]):
            members = np.flatnonzero(lengths[:count] == length)
            fill = count + np.flatnonzero(lengths[count:] == length)
            for i in range(0, len(members), rows):
                own = members[i : i + rows]
                extra, fill = fill[: rows - len(own)], fill[rows - len(own) :]
                calls.append((np.concatenate([own, extra]), int(length), len(own)))
        if progress:
            from tqdm import tqdm

            calls = tqdm(calls, desc="encode texts", unit="chunk")
        embeds = np.zeros((count, self.config.embed_dim), np.float32)
        filled: dict[str, np.ndarray] = {}
        for members, length, own in calls:
            padded = np.concatenate([members, members[-1:].repeat(rows - len(members))])
            out = self.backend.encode_texts(np.ascontiguousarray(ids[padded, :length]))
            embeds[members[:own]] = out[:own]
            filled.update((spare[index - count], out[own + j]) for j, index in enumerate(members[own:]))
        return embeds, filled

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
            self._tag_cache.update(zip(missing, embeds.astype(np.float32)))
        return np.stack([self._tag_cache[t] for t in tags]) if tags else np.zeros((0, self.config.embed_dim), np.float32)

    @property
    def negative_embeds(self) -> np.ndarray:
        """The model's negative prompts through the prompt ensemble [N, D] (the `negatives` score)."""
        if self._negatives is None:
            prompts = list(self.config.negative_prompts)
            if not prompts:
                raise InputError("the model config has no negative prompts: the `negatives` score needs at least one")
            self._negatives = self.encode_tags(prompts)
        return self._negatives

    def request(self, tag_lists: list[list[str]] | None = None, vocabulary_embeds: np.ndarray | None = None,
                with_cosines: bool = False) -> HeadRequest:
        """The tag head's inputs for per-image tag lists (zero-padded, with a validity mask), or
        for one vocabulary shared by every image (`vocabulary_embeds` [K, D])."""
        if vocabulary_embeds is not None:
            tag_embeds = np.asarray(vocabulary_embeds, np.float32)[None]
            valid = np.ones(tag_embeds.shape[:2], np.bool_)
        else:
            width = max(1, max((len(tags) for tags in tag_lists), default=0))
            tag_embeds = np.zeros((len(tag_lists), width, self.config.embed_dim), np.float32)
            valid = np.zeros((len(tag_lists), width), np.bool_)
            # the batch's novel tags go to the text encoder together (TEXT_ROWS makes each
            # embedding independent of which tags came with it), then each row is filled
            every = self.encode_tags([tag for tags in tag_lists for tag in tags])
            start = 0
            for row, tags in enumerate(tag_lists):
                tag_embeds[row, : len(tags)] = every[start : start + len(tags)]
                valid[row, : len(tags)] = True
                start += len(tags)
        return HeadRequest(tag_embeds, valid, self.negative_embeds[None],
                           np.array([[self.config.negative_margin]], np.float32), with_cosines)

    def _rows_per_call(self, tags: int) -> int:
        views = 2 if self.flip_tta else 1
        grid_h, grid_w = self.config.grid_size
        return max(1, HEAD_ELEMENTS // max(1, views * tags * grid_h * grid_w))

    def _chunked(self, run, batch: int, request: HeadRequest) -> TagHeadOutputs:
        """`run(rows, request of those rows)` over the batch in calls of at most HEAD_ELEMENTS map elements."""
        step = self._rows_per_call(request.tag_embeds.shape[1])
        if batch <= step:
            return run(slice(None), request)
        shared = len(request.tag_embeds) == 1
        parts = []
        for start in range(0, batch, step):
            rows = slice(start, start + step)
            part = request if shared else HeadRequest(request.tag_embeds[rows], request.tag_valid[rows],
                                                      request.negative_embeds, request.negative_margin,
                                                      request.with_cosines)
            parts.append(run(rows, part))
        return TagHeadOutputs(np.concatenate([p.tag_scores for p in parts]),
                              np.concatenate([p.tag_cosines for p in parts]) if request.with_cosines else None)

    def tag_images(self, images: np.ndarray, request: HeadRequest) -> TagHeadOutputs:
        """Every score (and the cosine maps if the request asks) of uint8 images [B, S, S, 3],
        encoder and head together on the backend's device. A backend that splits only its head
        (`splits_head`: torch) encodes the batch in one call; others run in chunks of both."""
        if getattr(self.backend, "splits_head", False):
            return self.backend.tag_images(images, self.preprocessing, request,
                                           rows_per_call=self._rows_per_call(request.tag_embeds.shape[1]))
        return self._chunked(lambda rows, part: self.backend.tag_images(images[rows], self.preprocessing, part),
                             len(images), request)

    def score_views(self, views: np.ndarray, request: HeadRequest) -> TagHeadOutputs:
        """The tag head on patch views [B, V, D, h, w] already encoded (`encode_images`)."""
        return self._chunked(lambda rows, part: self.backend.score_tags(views[rows], part), len(views), request)

    def encode_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image_embeds [B, D], patch views [B, V, D, h, w]) of uint8 images, on the host: for
        work that scores one encoding many times (evaluation, calibration, whole-image windows)."""
        pixels = normalize(with_flipped(images, self.flip_tta), self.config.mean, self.config.std)
        image_embeds, patch_embeds = self.backend.encode_images(pixels)
        return image_embeds[: len(images)], patch_views(patch_embeds, len(images))

    def masks(self, cosines: np.ndarray) -> np.ndarray:
        """M = sigmoid(w·cos + b) of cosine maps."""
        return sigmoid(self.mask_weight * cosines.astype(np.float32) + self.mask_bias).astype(np.float32)

    def tag(self, images: np.ndarray, tag_lists: list[list[str]], with_masks: bool = False) -> list[TagResult]:
        """Tag a batch: images uint8 [B, S, S, 3] (already at the model's size), one tag list each.
        One head call for the batch: the lists are padded, and the validity mask makes that exact."""
        outputs = self.tag_images(images, self.request(tag_lists, with_cosines=with_masks))
        return self._results(outputs, tag_lists)

    def tag_vocabulary(self, images: np.ndarray, tags: list[str], tag_embeds: np.ndarray | None = None,
                       with_masks: bool = False) -> list[TagResult]:
        """Tag a batch against one vocabulary (its embeddings [K, D], encoded here if not given)."""
        embeds = self.encode_tags(tags) if tag_embeds is None else tag_embeds
        outputs = self.tag_images(images, self.request(vocabulary_embeds=embeds, with_cosines=with_masks))
        return self._results(outputs, [tags] * len(images))

    def submit(self, images: np.ndarray, tag_lists: list[list[str]] | None = None,
               vocabulary_embeds: np.ndarray | None = None, with_masks: bool = False, top_k: int = 0) -> Pending:
        """`tag` (tag lists) or `tag_vocabulary` (embeddings) of a batch without waiting for it:
        a backend with a pipelined path (`submit`: torch) returns while the device works, with
        `top_k`'s candidates found there; any other backend runs now. `wait()` gives whole arrays
        (BatchScores: this Tagger's score of every tag), the same numbers as `tag`."""
        request = self.request(tag_lists, vocabulary_embeds, with_masks)
        row = SCORE_ROWS.index(self.score_method)
        submit = getattr(self.backend, "submit", None)
        if submit is not None:
            return submit(images, self.preprocessing, request, row, top_k,
                          self._rows_per_call(request.tag_embeds.shape[1]))
        outputs = self.tag_images(images, request)
        return Ready(BatchScores(score_row(outputs.tag_scores, self.score_method).astype(np.float32), None, outputs.tag_cosines))

    def _results(self, outputs: TagHeadOutputs, tag_lists: list[list[str]]) -> list[TagResult]:
        return self.results(score_row(outputs.tag_scores, self.score_method).astype(np.float32), outputs.tag_cosines, tag_lists)

    def results(self, scores: np.ndarray, cosines: np.ndarray | None, tag_lists: list[list[str]]) -> list[TagResult]:
        """TagResults of a batch's chosen scores [B, K] (and cosine maps, for masks)."""
        chosen = scores >= self.threshold  # vectorised: a Python loop over numpy scalars costs more than the head
        masks = self.masks(cosines) if cosines is not None else None
        results = []
        for row, tags in enumerate(tag_lists):
            k = len(tags)
            results.append(TagResult(list(tags), scores[row, :k], [tags[i] for i in np.flatnonzero(chosen[row, :k])],
                                     None if masks is None else masks[row, :k]))
        return results

    def negative_logits(self, views: np.ndarray, tag_embeds: np.ndarray,
                        negative_embeds: np.ndarray | None = None) -> np.ndarray:
        """The margin-free logits ℓ [V, B, K, h, w] of the `negatives` score (N = sigmoid(ℓ − m))
        for patch views [B, V, D, h, w] and tag embeddings [B, K, D]: what calibration fits m on.
        `negative_embeds` [N, D] replaces the model's negative prompts (calibration comparing sets).
        In float64 numpy: calibration runs without torch too (docs/edge.md)."""
        from ttd.model.scoring import negative_logits, view_cosines

        patches = np.asarray(views, np.float32)
        cosines = view_cosines(patches, np.asarray(tag_embeds, np.float32))
        chosen = self.negative_embeds if negative_embeds is None else negative_embeds
        negatives = view_cosines(patches, np.asarray(chosen, np.float32)[None])
        logits = negative_logits(cosines.astype(np.float64), negatives.astype(np.float64), self.config.tau)
        b, v, _, h, w = views.shape
        return logits.reshape(b, v, -1, h, w).transpose(1, 0, 2, 3, 4)
