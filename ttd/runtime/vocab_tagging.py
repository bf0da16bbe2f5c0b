"""Vocabulary tagging at the cost of image encoding: one batched tag head for a fixed vocabulary.

`Tagger.tag` serves per-image tag lists (captions), so it runs the tag head once per image with
full probability and mask maps. Against a fixed vocabulary every image shares the same [K, D]
tag embeddings, so the head becomes one matmul for the whole batch, the score needs only the
per-pixel log-sum-exp over tags (softmax) or the best-pixel cosine (sigmoid, minmax), and mask
maps are made only when asked for. The numbers are those of `Tagger.score` (a test holds this).
The head has no weights (τ, w, b only), so running it here rather than in the backend's tag-head
graph changes nothing but the cost.
"""

from __future__ import annotations

import numpy as np
import torch

from ttd.model.negatives import negative_contrast_maps
from ttd.runtime.tagger import Tagger, TagResult


def vocabulary_scores(patch_embeds: np.ndarray, tag_embeds: np.ndarray, flipped: np.ndarray | None, tau: float,
                      mask_weight: float, mask_bias: float, method: str, with_masks: bool,
                      negative_embeds: np.ndarray | None = None, negative_margin: float = 0.0,
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """scores [B, K] (and masks [B, K, h, w] if with_masks) of every image against every tag.

    `negative_embeds` [N, D] and `negative_margin`: the `negatives` score (ttd/model/negatives.py)."""
    if method == "negatives" and negative_embeds is None:
        raise ValueError("score method 'negatives' needs negative_embeds (the model's negative prompts, encoded)")
    with torch.inference_mode():
        tags = torch.from_numpy(np.ascontiguousarray(tag_embeds, np.float32))  # [K, D]
        views = [torch.from_numpy(np.ascontiguousarray(patch_embeds, np.float32))]
        if flipped is not None:  # mirror the flipped view's maps back (DESIGN §3.3 flip TTA)
            views.append(torch.from_numpy(np.ascontiguousarray(flipped[..., ::-1], np.float32)))
        b, d, h, w = views[0].shape
        needs_cosines = with_masks or method != "softmax" or len(views) > 1
        cosines = [torch.matmul(tags, v.reshape(b, d, h * w)) for v in views] if needs_cosines else []  # [B, K, hw]
        if method == "negatives":
            negatives = torch.from_numpy(np.ascontiguousarray(negative_embeds, np.float32))
            scores = torch.stack([negative_contrast_maps(c, torch.matmul(negatives, v.reshape(b, d, h * w)), tau,
                                                         negative_margin)
                                  for c, v in zip(cosines, views)]).mean(0).amax(dim=2)
        elif method == "softmax":
            if len(views) == 1:  # max_i softmax_k = exp(max_i(τc - lse_i)): no [B, K, hw] probability map
                logits = torch.matmul(tags * tau, views[0].reshape(b, d, h * w))  # τ folded into the K×D side
                scores = logits.sub_(torch.logsumexp(logits, dim=1, keepdim=True)).amax(dim=2).exp()
            else:
                scores = torch.stack([torch.softmax(c * tau, dim=1) for c in cosines]).mean(0).amax(dim=2)
        elif len(views) == 1:  # a sigmoid mask is monotonic in the cosine: its peak is at the best pixel
            peak = torch.sigmoid(mask_weight * cosines[0].amax(dim=2) + mask_bias)
            scores = peak if method == "sigmoid" else _minmax_from_peak(peak, mask_weight, mask_bias)
        elif method == "sigmoid":
            scores = torch.stack([torch.sigmoid(mask_weight * c + mask_bias) for c in cosines]).mean(0).amax(dim=2)
        else:  # flip TTA averages the views' cosine maps (as ttd.model.scoring and the Tagger do)
            scores = _minmax(torch.stack(cosines).mean(0).amax(dim=2).double())
        masks = None
        if with_masks:
            masks = torch.stack([torch.sigmoid(mask_weight * c + mask_bias) for c in cosines]).mean(0)
            masks = masks.reshape(b, -1, h, w).numpy()
        return scores.float().numpy(), masks


def _minmax_from_peak(peak: torch.Tensor, weight: float, bias: float) -> torch.Tensor:
    peak = peak.double().clamp(1e-7, 1 - 1e-7)
    return _minmax((torch.log(peak / (1 - peak)) - bias) / weight)


def _minmax(cos: torch.Tensor) -> torch.Tensor:
    low, high = cos.amin(dim=1, keepdim=True), cos.amax(dim=1, keepdim=True)
    span = high - low
    return torch.where(span > 0, (cos - low) / torch.where(span > 0, span, 1), torch.ones_like(cos))


def tag_with_vocabulary(tagger: Tagger, images: np.ndarray, tags: list[str], tag_embeds: np.ndarray,
                        with_masks: bool = False) -> list[TagResult]:
    """Tag a batch of uint8 images [B, S, S, 3] against one vocabulary (tags, their embeddings [K, D]).

    Results as `Tagger.tag` gives them; their masks are [K, 0, 0] unless with_masks."""
    _, patch_embeds, flipped = tagger.encode_images(images)
    negatives = tagger.encode_tags(list(tagger.config.negative_prompts)) if tagger.score_method == "negatives" else None
    scores, masks = vocabulary_scores(patch_embeds, tag_embeds, flipped, tagger.config.tau, tagger.mask_weight,
                                      tagger.mask_bias, tagger.score_method, with_masks, negatives,
                                      tagger.config.negative_margin)
    empty = np.zeros((len(tags), 0, 0), np.float32)
    chosen = scores >= tagger.threshold  # vectorised: a Python loop over K numpy scalars per image costs more than the head
    return [TagResult(list(tags), s, [tags[k] for k in np.flatnonzero(chosen[i])],
                      masks[i] if masks is not None else empty) for i, s in enumerate(scores.astype(np.float32))]
