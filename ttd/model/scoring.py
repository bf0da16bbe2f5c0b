"""THE scoring function (docs/architecture.md §3.3): every pixel-tag score and the cosine maps, in one place.

`tag_head` is what training's Stage 1, evaluation, calibration, the runtime Tagger, vocabulary
mode, whole-image inference and the exported tag-head graph run (the ONNX and TensorRT tag head
is this function traced), so a score is defined once and never re-derived from another output.

Shapes: B images, V views of each (flip TTA: the flipped view's features already mirrored back),
D embedding dims, h×w patches, K tags, N negative prompts. Tag inputs have a leading dim T that
is B (a tag list per image) or 1 (one vocabulary for every image), broadcast against the images.
`tag_valid` [T, K] marks the real tags of a padded list: padded tags score 0 and take no part in
any score (the softmax and the min-max over tags included), so one call serves a whole batch.

The scores, rows of `tag_scores` [B, len(SCORE_ROWS), K] (ttd.model.contract.SCORE_ROWS):
- negatives: N_k(i) = sigmoid(τ·cos(f_i, e_k) − log Σ_n exp(τ·cos(f_i, e_n)) − m), s_k = max_i N_k(i):
  each tag against the model's negative prompts (generic words that match every image and no
  region in particular), shifted by the margin m that calibration fits to the model. Tags of one
  caption do not compete, so an attribute and its object ("orange heart") can both pass.
- softmax (the paper): s_k = max_i softmax_k(τ·cos(f_i, e_k)) over the valid tags.
- minmax: max over pixels of the cosine, min-max normalised over the valid tags.
- sigmoid: s_k = max_i M_k(i) with the mask M_k(i) = sigmoid(w·cos(f_i, e_k) + b).
- peak_cosine: max_i cos(f_i, e_k) itself (whole-image inference takes minmax over windows from it).
Views average the per-pixel maps before the max over pixels (cosines for minmax and peak_cosine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ttd.model.contract import SCORE_ROWS, score_row  # noqa: F401 - score_row: part of the scoring API

if TYPE_CHECKING:
    import torch

MASKED_LOGIT = -1.0e4  # τ·cos lies in [−τ, τ]: exp of this is exactly 0 in float32, and never NaN as −inf can be
NO_VALUE = 1.0e4  # an out-of-range cosine that padded tags take in the min and max over tags


@dataclass(frozen=True)
class ArrayOps:
    """The few array operations whose spelling differs between numpy and torch. The functions the
    runtime without torch needs (combining windows, calibration's logits; docs/edge.md) take numpy
    arrays or torch tensors through these, so each score is still written once (§3.3)."""

    where: Callable
    amax: Callable  # (x, axis, keepdims)
    amin: Callable  # (x, axis, keepdims)
    full_like: Callable
    ones_like: Callable
    concat: Callable
    cast: Callable  # (x, like): x in the dtype of `like`
    expand_as: Callable  # (x, like): x broadcast to the shape of `like`
    logsumexp: Callable  # (x, axis, keepdims)


def _numpy_logsumexp(x: np.ndarray, axis: int, keepdims: bool) -> np.ndarray:
    peak = x.max(axis=axis, keepdims=True)
    out = peak + np.log(np.exp(x - peak).sum(axis=axis, keepdims=True))
    return out if keepdims else out.squeeze(axis)


NUMPY_OPS = ArrayOps(np.where, lambda x, axis, keepdims: x.max(axis=axis, keepdims=keepdims),
                     lambda x, axis, keepdims: x.min(axis=axis, keepdims=keepdims), np.full_like, np.ones_like,
                     np.concatenate, lambda x, like: x.astype(like.dtype, copy=False),
                     lambda x, like: np.broadcast_to(x, like.shape), _numpy_logsumexp)


def array_ops(x: Any) -> ArrayOps:
    """numpy's operations for a numpy array, torch's for anything else (imported only then)."""
    if isinstance(x, np.ndarray):
        return NUMPY_OPS
    import torch

    return ArrayOps(torch.where, lambda x, axis, keepdims: x.amax(dim=axis, keepdim=keepdims),
                    lambda x, axis, keepdims: x.amin(dim=axis, keepdim=keepdims), torch.full_like, torch.ones_like,
                    torch.cat, lambda x, like: x.to(like.dtype), lambda x, like: x.expand_as(like),
                    lambda x, axis, keepdims: torch.logsumexp(x, dim=axis, keepdim=keepdims))


def pixel_cosines(patch_embeds: torch.Tensor, tag_embeds: torch.Tensor) -> torch.Tensor:
    """cos(f_i, e_k): patch_embeds [B, D, h, w], tag_embeds [B, K, D] -> [B, K, h, w] (training's masks)."""
    import torch

    return torch.einsum("bdhw,bkd->bkhw", patch_embeds, tag_embeds.to(patch_embeds.dtype))


def tag_masks(cosines: torch.Tensor, weight: torch.Tensor | float, bias: torch.Tensor | float) -> torch.Tensor:
    """M_k(i) = sigmoid(w·cos(f_i, e_k) + b)."""
    import torch

    return torch.sigmoid(weight * cosines + bias)


def view_cosines(patch_views: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """[B, V, D, h, w] views and [T, K, D] embeddings (T = B or 1) -> cosines [B, V, K, h·w]
    (numpy arrays or torch tensors)."""
    b, v, d, h, w = patch_views.shape
    return array_ops(patch_views).cast(embeds, patch_views)[:, None] @ patch_views.reshape(b, v, d, h * w)


def negative_logits(cosines: torch.Tensor, negative_cosines: torch.Tensor, tau: float) -> torch.Tensor:
    """The margin-free logits ℓ_k(i) = τ·cos_k(i) − log Σ_n exp(τ·cos_n(i)) of the negatives score
    (N_k = sigmoid(ℓ_k − m)): what calibration fits m on. Cosines [..., K, P] and [..., N, P]
    (numpy arrays or torch tensors)."""
    return tau * cosines - array_ops(cosines).logsumexp(tau * negative_cosines, -2, True)


def tag_head(patch_views: torch.Tensor, tag_embeds: torch.Tensor, tag_valid: torch.Tensor,
             negative_embeds: torch.Tensor, negative_margin: torch.Tensor, tau: float,
             mask_weight: float | torch.Tensor, mask_bias: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tag_scores [B, len(SCORE_ROWS), K], tag_cosines [B, K, h, w]) of every score at once.

    patch_views [B, V, D, h, w] (unit vectors), tag_embeds [T, K, D], tag_valid [T, K] bool,
    negative_embeds [T, N, D], negative_margin [T, 1]. `tag_cosines` are the view-averaged cosine
    maps: masks are sigmoid(w·cos + b) of them (`tag_masks`), computed only where asked for.
    """
    import torch

    b, _, _, h, w = patch_views.shape
    valid = tag_valid.to(torch.bool)
    cosines = view_cosines(patch_views, tag_embeds)  # [B, V, K, P]
    logits = negative_logits(cosines, view_cosines(patch_views, negative_embeds), tau)
    margin = negative_margin.to(cosines.dtype).reshape(-1, 1, 1, 1)
    negatives = torch.sigmoid(logits - margin).mean(1).amax(-1)
    pixel_logits = torch.where(valid[:, None, :, None], tau * cosines, torch.full_like(cosines, MASKED_LOGIT))
    softmax = torch.softmax(pixel_logits, dim=2).mean(1).amax(-1)
    sigmoid = tag_masks(cosines, mask_weight, mask_bias).mean(1).amax(-1)
    mean_cosines = cosines.mean(1)  # [B, K, P]
    peak = mean_cosines.amax(-1)
    scores = {"negatives": negatives, "softmax": softmax, "minmax": minmax_over_tags(peak, valid),
              "sigmoid": sigmoid, "peak_cosine": peak}
    tag_scores = torch.stack([scores[row] for row in SCORE_ROWS], dim=1) * valid[:, None, :].to(peak.dtype)
    return tag_scores, mean_cosines.reshape(b, -1, h, w)


def minmax_over_tags(raw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Min-max normalise [B, K] over the valid tags of each row (a row whose valid tags tie scores 1);
    numpy arrays or torch tensors."""
    ops = array_ops(raw)
    valid = ops.expand_as(valid, raw)
    low = ops.amin(ops.where(valid, raw, ops.full_like(raw, NO_VALUE)), 1, True)
    high = ops.amax(ops.where(valid, raw, ops.full_like(raw, -NO_VALUE)), 1, True)
    span = high - low
    return ops.where(span > 0, (raw - low) / ops.where(span > 0, span, ops.ones_like(span)), ops.ones_like(raw))


def combine_windows(tag_scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[..., W, len(SCORE_ROWS), K] scores of W windows (and scales) of one image -> that image's
    [..., len(SCORE_ROWS), K]: a per-pixel score's best pixel is its best window's; minmax is taken
    again over the tags' best cosines of the whole image. Leading dimensions are images combined
    together, `valid` [..., K] their real tags (padding is left out of the minmax). numpy arrays
    or torch tensors."""
    ops = array_ops(tag_scores)
    combined = ops.amax(tag_scores, -3, False)
    peak = combined[..., SCORE_ROWS.index("peak_cosine"), :]
    rows = peak.reshape(-1, peak.shape[-1])
    minmax = minmax_over_tags(rows, ops.ones_like(rows) > 0 if valid is None else valid.reshape(rows.shape))
    at = SCORE_ROWS.index("minmax")
    return ops.concat([combined[..., :at, :], minmax.reshape(peak.shape)[..., None, :], combined[..., at + 1 :, :]],
                      -2)


def global_tag_scores(embeds: torch.Tensor, tag_embeds: torch.Tensor, tau: float,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """softmax_k(τ·cos(g, e_k)) for an image (image-tag) or caption (text-tag) embedding [B, D] -> [B, K]:
    the scores that *measure* the single tag bias; not the method."""
    import torch

    logits = tau * torch.einsum("bd,bkd->bk", embeds, tag_embeds.to(embeds.dtype))
    if valid is not None:
        logits = torch.where(valid, logits, torch.full_like(logits, MASKED_LOGIT))
    probs = torch.softmax(logits, dim=1)
    return probs if valid is None else probs * valid


def minmax_over_pixels(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise [B, K, h, w] maps over their pixels, per tag (Stage 2's targets)."""
    import torch

    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-6)


def select_tags(scores: torch.Tensor, threshold: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tag k is selected when s_k ≥ δ."""
    selected = scores >= threshold
    return selected if valid is None else selected & valid


def pad_tags(tag_lists: list[list[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Unique tags of a batch, index [B, K] into them (0 for padding) and the valid mask [B, K]."""
    import torch

    unique = list(dict.fromkeys(t for tags in tag_lists for t in tags))
    position = {t: i for i, t in enumerate(unique)}
    k = max((len(t) for t in tag_lists), default=0)
    index = torch.zeros(len(tag_lists), max(k, 1), dtype=torch.long)
    valid = torch.zeros(len(tag_lists), max(k, 1), dtype=torch.bool)
    for row, tags in enumerate(tag_lists):
        index[row, : len(tags)] = torch.tensor([position[t] for t in tags], dtype=torch.long)
        valid[row, : len(tags)] = True
    return unique, index, valid
