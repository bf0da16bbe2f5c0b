"""TTDModel: an open_clip ViT CLIP with dense patch features, tag prompt ensembles and the
learnable mask calibration (w, b) of DESIGN §3.3."""

from __future__ import annotations

from ttd.errors import InputError
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from ttd.model.config import DENSE_MODES, ModelConfig
from ttd.model.dense import check_supported, encode_image_dense
from ttd.model.tokenizer import Tokenizer, build_tokenizer


class TTDModel(nn.Module):
    """CLIP + dense features + mask calibration. Embeddings it returns are L2-normalised."""

    def __init__(self, config: ModelConfig, clip: CLIP) -> None:
        super().__init__()
        if config.dense_mode not in DENSE_MODES:
            raise InputError(f"unknown dense mode {config.dense_mode!r}; choose one of {', '.join(DENSE_MODES)}")
        check_supported(clip.visual)
        self.config = config
        self.clip = clip
        self.mask_weight = nn.Parameter(torch.tensor(float(config.mask_weight_init)))
        self.mask_bias = nn.Parameter(torch.tensor(float(config.mask_bias_init)))
        self.tokenizer: Tokenizer = build_tokenizer(config.tokenizer, config.context_length)

    @property
    def device(self) -> torch.device:
        return self.mask_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.proj.dtype

    def encode_image(self, pixel_values: torch.Tensor, dense_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds [B, D], patch_embeds [B, D, h, w]), both unit vectors."""
        image_embeds, patch_embeds = encode_image_dense(
            self.clip.visual, pixel_values.to(self.dtype), dense_mode or self.config.dense_mode
        )
        return F.normalize(image_embeds, dim=-1), F.normalize(patch_embeds, dim=1)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(input_ids), dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.tokenizer(texts)).to(self.device)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(texts))

    def encode_tags(self, tags: list[str]) -> torch.Tensor:
        """Prompt-ensemble tag embeddings [K, D]: mean of normalised template embeddings, re-normalised."""
        templates = self.config.prompt_templates
        if not tags:
            return torch.zeros(0, self.config.embed_dim, device=self.device, dtype=self.dtype)
        prompts = [template.format(tag) for tag in tags for template in templates]
        embeds = self.encode_texts(prompts).reshape(len(tags), len(templates), -1)
        return F.normalize(embeds.mean(dim=1), dim=-1)
