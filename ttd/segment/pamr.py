"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), the optional last step of
open-vocabulary segmentation (docs/architecture.md §3.5).

Patch-level masks are blocky; PAMR pulls each pixel's mask values towards those of its
neighbours that look like it. For every pixel, neighbours at several dilations get an affinity
from their colour difference, scaled by the local colour spread (so the rule adapts to texture),
softmax-normalised over the neighbours; the masks are then averaged with those affinities a few
times. Each step is a convex combination, so values stay in [0, 1] and a constant map (the
background channel θ) stays constant.
"""

from __future__ import annotations

import numpy as np

from ttd.errors import InputError

DILATIONS = (1, 2, 4, 8, 12, 24)
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(x: np.ndarray, dilations: tuple[int, ...]) -> np.ndarray:
    """[C, H, W] -> [C, P, H, W]: the values at the 8 neighbours of every pixel at each dilation
    (edges replicated), P = 8·len(dilations)."""
    _, height, width = x.shape
    pad = max(dilations)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    shifted = [padded[:, pad + dy * d : pad + dy * d + height, pad + dx * d : pad + dx * d + width]
               for d in dilations for dy, dx in OFFSETS]
    return np.stack(shifted, axis=1)


def affinities(image: np.ndarray, dilations: tuple[int, ...] = DILATIONS, spread: float = 0.1) -> np.ndarray:
    """[P, H, W] neighbour weights of every pixel of a uint8 [H, W, 3] image (each pixel's sum to 1)."""
    x = (np.asarray(image, np.float32) / np.float32(255.0)).transpose(2, 0, 1)
    near = _neighbours(x, dilations)  # [3, P, H, W]
    scale = np.maximum(near.std(axis=1, ddof=1, keepdims=True), np.float32(1e-3)) * np.float32(spread)
    distance = (np.abs(near - x[:, None]) / scale).mean(axis=0)  # [P, H, W]
    weights = np.exp(-distance - (-distance).max(axis=0, keepdims=True))
    return (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)


def pamr(image: np.ndarray, masks: np.ndarray, iterations: int = 10,
         dilations: tuple[int, ...] = DILATIONS) -> np.ndarray:
    """Refined masks [K, H, W] (float32 in [0, 1]) of an image uint8 [H, W, 3] of the same size."""
    if image.shape[:2] != masks.shape[-2:]:
        raise InputError(f"PAMR: image {image.shape[:2]} and masks {masks.shape[-2:]} differ in size")
    weights = affinities(image, dilations)
    out = np.empty(masks.shape, np.float32)
    for k in range(len(masks)):  # one class at a time: P neighbour maps per class are large
        refined = np.asarray(masks[k : k + 1], np.float32)
        for _ in range(iterations):
            refined = (_neighbours(refined, dilations) * weights[None]).sum(axis=1)
        out[k] = refined[0]
    return out
