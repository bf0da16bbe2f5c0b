"""The three graphs of the export contract (docs/architecture.md §4) as nn.Modules.

The torch runtime runs exactly these modules, and `ttd export` traces exactly these, so
PyTorch and ONNX compute the same thing by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttd.model.clip import TTDModel
from ttd.model.scoring import tag_head


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
        if input_ids.shape[1] < self.model.clip.positional_embedding.shape[0]:
            return self._prefix(input_ids)
        return self.model.encode_text(input_ids).float()

    @property
    def accepts_prefix(self) -> bool:
        """Whether ids cut after their end-of-text token give the full context's embedding: true
        of a causal text transformer pooled at that token (each position sees only the ones
        before it, so the padding after it changes nothing), which CLIP's is."""
        clip = self.model.clip
        return getattr(clip, "attn_mask", None) is not None and getattr(clip, "text_pool_type", None) == "argmax"

    def _prefix(self, input_ids: torch.Tensor) -> torch.Tensor:
        """open_clip's CLIP.encode_text on the first L positions only (accepts_prefix): the text
        transformer's work shrinks with the texts' own length, not the context's."""
        return F.normalize(self.model.encode_text_prefix(input_ids), dim=-1).float()


class TagHeadGraph(nn.Module):
    """The scoring function (ttd.model.scoring.tag_head) with the model's τ, w and b as constants:
    patch_views [B, V, D, h, w], tag_embeds [T, K, D], tag_valid [T, K], negative_embeds [T, N, D],
    negative_margin [T, 1] -> tag_scores [B, len(SCORE_ROWS), K], tag_cosines [B, K, h, w]."""

    def __init__(self, tau: float, mask_weight: float, mask_bias: float) -> None:
        super().__init__()
        self.tau, self.mask_weight, self.mask_bias = float(tau), float(mask_weight), float(mask_bias)

    def forward(self, patch_views: torch.Tensor, tag_embeds: torch.Tensor, tag_valid: torch.Tensor,
                negative_embeds: torch.Tensor, negative_margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tag_head(patch_views, tag_embeds, tag_valid, negative_embeds, negative_margin, self.tau,
                        self.mask_weight, self.mask_bias)
