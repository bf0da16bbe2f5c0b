"""The three graphs of the export contract (DESIGN §4) as nn.Modules.

The torch runtime runs exactly these modules, and `ttd export` traces exactly these, so
PyTorch and ONNX compute the same thing by construction.
"""

from __future__ import annotations

import torch
from torch import nn

from ttd.model.clip import TTDModel
from ttd.model.scoring import pixel_cosines, pixel_tag_probs, tag_masks


class ImageEncoderGraph(nn.Module):
    """pixel_values [B, 3, H, W] -> image_embeds [B, D], patch_embeds [B, D, h, w] (unit vectors)."""

    def __init__(self, model: TTDModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds, patch_embeds = self.model.encode_image(pixel_values)
        return image_embeds.float(), patch_embeds.float()


class TextEncoderGraph(nn.Module):
    """input_ids [B, L] -> text_embeds [B, D] (unit vectors)."""

    def __init__(self, model: TTDModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids).float()


class TagHeadGraph(nn.Module):
    """patch_embeds [B, D, h, w], tag_embeds [B, K, D] -> tag_scores [B, K], tag_masks and
    tag_probs [B, K, h, w]. τ, w and b are baked in as constants.

    tag_probs (the per-pixel softmax over tags) lets a runtime average two views (flip TTA)
    before taking the max over pixels, as DESIGN §3.3 defines the score.
    """

    def __init__(self, tau: float, mask_weight: float, mask_bias: float) -> None:
        super().__init__()
        self.tau, self.mask_weight, self.mask_bias = float(tau), float(mask_weight), float(mask_bias)

    def forward(self, patch_embeds: torch.Tensor, tag_embeds: torch.Tensor):
        probs = pixel_tag_probs(patch_embeds, tag_embeds, self.tau)
        masks = tag_masks(pixel_cosines(patch_embeds, tag_embeds), self.mask_weight, self.mask_bias)
        return probs.amax(dim=(2, 3)), masks, probs
