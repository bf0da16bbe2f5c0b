"""The mask of a selected tag as `ttd tag` hands it out: a PNG file (--masks-dir) or COCO RLE in
the record (--rle-masks). Both come from `mask_image`, so they cover the same pixels: the
model's centre crop at its input size (S x S), upsampled bilinearly from the patch grid.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ttd.jobs.coco import encode_rle
from ttd.model.config import DEFAULT_MASK_THRESHOLD
from ttd.runtime.tagger import TagResult


def mask_image(mask: np.ndarray, size: int) -> Image.Image:
    """A sigmoid mask [h, w] in [0, 1] as an 8-bit grey image (M x 255) of size x size."""
    return Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)


def rle_masks(result: TagResult, size: int, threshold: float = DEFAULT_MASK_THRESHOLD) -> dict[str, dict]:
    """tag -> compressed COCO RLE ({"size": [S, S], "counts": str}) of each selected tag's mask:
    the PNG of --masks-dir thresholded at M ≥ θ (the model's default mask threshold)."""
    masks = {}
    for tag in result.selected:
        grey = np.asarray(mask_image(result.masks[result.tags.index(tag)], size))
        masks[tag] = encode_rle(grey >= threshold * 255)
    return masks
