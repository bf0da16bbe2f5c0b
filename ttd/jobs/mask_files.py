"""The mask of a selected tag as `ttd tag` hands it out: a PNG file (--masks-dir) or COCO RLE in
the record (--rle-masks). Both come from `mask_image`, so they cover the same pixels, in the
input image's own width and height: the model saw its centre crop, so the mask (upsampled
bilinearly from the patch grid) is laid where the crop was and the rest is background.
"""

from __future__ import annotations

from ttd.jobs.coco import encode_rle
from ttd.model.config import DEFAULT_MASK_THRESHOLD
from ttd.runtime.tagger import TagResult
from ttd.segment.masks import boolean_mask, mask_image  # noqa: F401 - mask_image: the PNG of --masks-dir


def rle_masks(result: TagResult, size: int, image_size: tuple[int, int],
              threshold: float = DEFAULT_MASK_THRESHOLD) -> dict[str, dict]:
    """tag -> compressed COCO RLE ({"size": [H, W], "counts": str}) of each selected tag's mask:
    the PNG of --masks-dir thresholded at M ≥ θ (the model's default mask threshold)."""
    masks = {}
    for tag in result.selected:
        masks[tag] = encode_rle(boolean_mask(result.masks[result.tags.index(tag)], size, image_size, threshold))
    return masks
