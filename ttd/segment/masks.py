"""A tag's mask as `ttd tag` and `ttd.Tagger.tag` hand it out, in the input image's own width and
height: the model saw its centre crop, so the mask (upsampled bilinearly from the patch grid) is
laid where the crop was and the rest is background."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ttd.model.config import DEFAULT_MASK_THRESHOLD
from ttd.segment.whole_image import center_crop_box


def mask_image(mask: np.ndarray, size: int, image_size: tuple[int, int]) -> Image.Image:
    """A sigmoid mask [h, w] in [0, 1] of a model of input `size`, as an 8-bit grey image (M x 255)
    of the input image's (width, height): the centre crop's mask where the crop was, 0 elsewhere."""
    width, height = image_size
    left, top, right, bottom = center_crop_box(width, height, size)
    box = (round(left), round(top), max(round(left) + 1, round(right)), max(round(top) + 1, round(bottom)))
    grey = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8), "L")
    canvas = Image.new("L", (width, height), 0)
    canvas.paste(grey.resize((box[2] - box[0], box[3] - box[1]), Image.BILINEAR), box[:2])
    return canvas


def boolean_mask(mask: np.ndarray, size: int, image_size: tuple[int, int],
                 threshold: float = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """bool [height, width]: the PNG of `mask_image` at M ≥ θ (what --masks-dir and --rle-masks hold)."""
    return np.asarray(mask_image(mask, size, image_size)) >= threshold * 255
