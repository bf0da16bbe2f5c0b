"""The `negatives` pixel-tag score (DESIGN §3.3): each tag against a fixed set of negative prompts.

The paper's score is a softmax over a caption's own tags at every pixel, so tags that name the
same pixels ("orange heart": a colour and a shape) compete and at most one passes δ = 0.5. Here
each tag competes only with negative prompts (generic words such as "photo" or "scene", which
match every image and no region in particular):

    N_k(i) = sigmoid(τ·cos(f_i, e_k) − log Σ_n exp(τ·cos(f_i, e_n)) − m),   s_k = max_i N_k(i)

i.e. the two-way softmax of the tag against the pooled negatives, shifted by the margin m (a
logit, fitted for selection at δ = 0.5 on a calibration split: benchmarks/scorers.py). Tags of
one caption do not interact, so an attribute and its object can both pass while an absent tag,
which loses to the negatives everywhere, stays low. Flip TTA averages the views' N maps.

Two implementations of one formula: torch (Stage 1 of training, ttd.model.scoring) from cosines, and
numpy (the runtime Tagger) from the `tag_probs` output of one tag-head call over tags and
negatives together, which every backend already has: log N_k's logit = log P_k − log Σ_n P_n − m
exactly, whatever the softmax's denominator.
"""

from __future__ import annotations

import numpy as np
import torch

TINY = np.finfo(np.float32).tiny  # a probability that underflowed to 0 counts as the smallest float32


def negative_contrast_maps(cosines: torch.Tensor, negative_cosines: torch.Tensor, tau: float,
                           margin: float) -> torch.Tensor:
    """N_k(i) [B, K, h, w] from tag cosines [B, K, h, w] and negative cosines [B, N, h, w]."""
    pooled = torch.logsumexp(tau * negative_cosines, dim=1, keepdim=True)
    return torch.sigmoid(tau * cosines - pooled - margin)


def negative_contrast_scores(patch_views: list[torch.Tensor], tag_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                             tau: float, margin: float) -> torch.Tensor:
    """s_k [B, K]: patch_views = the [B, D, h, w] dense features of each view (flipped ones already
    mirrored back), tag_embeds [B, K, D], negative_embeds [N, D]; the views' maps are averaged."""
    if negative_embeds.ndim != 2 or negative_embeds.shape[0] == 0:
        raise ValueError("the negatives score needs at least one negative prompt embedding [N, D]")
    maps = []
    for view in patch_views:
        cosines = torch.einsum("bdhw,bkd->bkhw", view, tag_embeds.to(view.dtype))
        negative_cosines = torch.einsum("bdhw,nd->bnhw", view, negative_embeds.to(view.dtype))
        maps.append(negative_contrast_maps(cosines, negative_cosines, tau, margin))
    return torch.stack(maps).mean(0).amax(dim=(2, 3))


def negative_logits_from_probs(probs: np.ndarray, tags: int) -> np.ndarray:
    """The margin-free logits ℓ_k(i) = log P_k − log Σ_n P_n [B, K, h, w] (float64: a difference
    of logs) from a tag head's per-pixel softmax [B, K + N, h, w] over the K tags followed by the
    N negatives; N_k = sigmoid(ℓ_k − m). Calibration (ttd/evaluation/calibrate.py) fits m on them."""
    probs = np.maximum(probs.astype(np.float64), TINY)
    return np.log(probs[:, :tags]) - np.log(probs[:, tags:].sum(axis=1, keepdims=True))


def negative_contrast_from_probs(probs: np.ndarray, tags: int, margin: float) -> np.ndarray:
    """N_k(i) [B, K, h, w] from a tag head's per-pixel softmax [B, K + N, h, w] over the K tags
    followed by the N negatives."""
    return sigmoid(negative_logits_from_probs(probs, tags) - margin)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function without overflow warnings for large negative logits."""
    return 0.5 * (1.0 + np.tanh(0.5 * logits))
