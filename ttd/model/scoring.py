"""Image-tag, text-tag and pixel-tag scores, tag selection and masks (DESIGN §3.3).

Tags of a batch are padded to K with a boolean `valid` mask [B, K]; padded tags get score 0
and never take part in a softmax. Embeddings are unit vectors, so a dot product is a cosine.
"""

from __future__ import annotations

from typing import Literal

import torch

from ttd.model.config import DEFAULT_NEGATIVE_MARGIN, SCORE_METHODS
from ttd.model.negatives import negative_contrast_scores

ScoreMethod = Literal["negatives", "softmax", "minmax", "sigmoid"]
NEG_INF = float("-inf")


def _masked_softmax(logits: torch.Tensor, valid: torch.Tensor | None, dim: int) -> torch.Tensor:
    if valid is not None:
        logits = logits.masked_fill(~valid, NEG_INF)
    probs = torch.softmax(logits, dim=dim)
    return torch.nan_to_num(probs, nan=0.0)  # rows with no valid tag


def pixel_cosines(patch_embeds: torch.Tensor, tag_embeds: torch.Tensor) -> torch.Tensor:
    """cos(f_i, e_k): patch_embeds [B, D, h, w], tag_embeds [B, K, D] -> [B, K, h, w]."""
    return torch.einsum("bdhw,bkd->bkhw", patch_embeds, tag_embeds.to(patch_embeds.dtype))


def global_tag_scores(
    embeds: torch.Tensor, tag_embeds: torch.Tensor, tau: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax_k(τ·cos(g, e_k)) for an image (image-tag) or caption (text-tag) embedding [B, D] -> [B, K]."""
    logits = tau * torch.einsum("bd,bkd->bk", embeds, tag_embeds.to(embeds.dtype))
    return _masked_softmax(logits, valid, dim=1)


def pixel_tag_probs(
    patch_embeds: torch.Tensor, tag_embeds: torch.Tensor, tau: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """P_k(i) = softmax_k(τ·cos(f_i, e_k)) at every pixel: [B, K, h, w]."""
    logits = tau * pixel_cosines(patch_embeds, tag_embeds)
    return _masked_softmax(logits, None if valid is None else valid[:, :, None, None], dim=1)


def tag_masks(cosines: torch.Tensor, weight: torch.Tensor | float, bias: torch.Tensor | float) -> torch.Tensor:
    """M_k(i) = sigmoid(w·cos(f_i, e_k) + b)."""
    return torch.sigmoid(weight * cosines + bias)


def pixel_tag_scores(
    patch_embeds: torch.Tensor,
    tag_embeds: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
    method: ScoreMethod = "softmax",
    mask_weight: torch.Tensor | float = 10.0,
    mask_bias: torch.Tensor | float = -2.5,
    flipped_patch_embeds: torch.Tensor | None = None,
    negative_embeds: torch.Tensor | None = None,
    negative_margin: float = DEFAULT_NEGATIVE_MARGIN,
) -> torch.Tensor:
    """s_k for each tag [B, K] by one of the normalisations of DESIGN §3.3.

    `negative_embeds` [N, D] (the model's negative prompts) and `negative_margin` serve the
    `negatives` score only (ttd/model/negatives.py).

    `flipped_patch_embeds`: the dense features of the horizontally flipped image (flip TTA);
    they are flipped back and the two per-pixel maps averaged before the max over pixels.
    """
    views = [patch_embeds]
    if flipped_patch_embeds is not None:
        views.append(flipped_patch_embeds.flip(-1))
    if method == "negatives":
        if negative_embeds is None:
            raise ValueError("score method 'negatives' needs negative_embeds (the model's negative prompts, encoded)")
        scores = negative_contrast_scores(views, tag_embeds, negative_embeds, tau, float(negative_margin))
    elif method == "softmax":
        maps = torch.stack([pixel_tag_probs(v, tag_embeds, tau, valid) for v in views]).mean(0)
        scores = maps.amax(dim=(2, 3))
    elif method == "sigmoid":
        maps = torch.stack([tag_masks(pixel_cosines(v, tag_embeds), mask_weight, mask_bias) for v in views]).mean(0)
        scores = maps.amax(dim=(2, 3))
    elif method == "minmax":
        raw = torch.stack([pixel_cosines(v, tag_embeds) for v in views]).mean(0).amax(dim=(2, 3))
        scores = minmax_over_tags(raw, valid)
    else:
        raise ValueError(f"unknown score method {method!r}; choose one of {', '.join(SCORE_METHODS)}")
    return scores if valid is None else scores * valid


def minmax_over_tags(raw: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Min-max normalise [B, K] over the valid tags of each row (a single tag scores 1)."""
    if valid is None:
        valid = torch.ones_like(raw, dtype=torch.bool)
    low = raw.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)
    high = raw.masked_fill(~valid, NEG_INF).amax(dim=1, keepdim=True)
    return torch.where(high > low, (raw - low) / (high - low).clamp_min(1e-12), torch.ones_like(raw))


def minmax_over_pixels(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise [B, K, h, w] maps over their pixels, per tag."""
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-6)


def select_tags(scores: torch.Tensor, threshold: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tag k is selected when s_k ≥ δ."""
    selected = scores >= threshold
    return selected if valid is None else selected & valid


def pad_tags(tag_lists: list[list[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Unique tags of a batch, index [B, K] into them (0 for padding) and the valid mask [B, K]."""
    unique = list(dict.fromkeys(t for tags in tag_lists for t in tags))
    position = {t: i for i, t in enumerate(unique)}
    k = max((len(t) for t in tag_lists), default=0)
    index = torch.zeros(len(tag_lists), max(k, 1), dtype=torch.long)
    valid = torch.zeros(len(tag_lists), max(k, 1), dtype=torch.bool)
    for row, tags in enumerate(tag_lists):
        index[row, : len(tags)] = torch.tensor([position[t] for t in tags], dtype=torch.long)
        valid[row, : len(tags)] = True
    return unique, index, valid
