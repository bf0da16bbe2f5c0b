"""TTDModel: an open_clip ViT CLIP with dense patch features, tag prompt ensembles and the
learnable mask calibration (w, b) of DESIGN §3.3."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from ttd.dense import DENSE_MODES, check_supported, encode_image_dense
from ttd.tokenizer import Tokenizer, build_tokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a photo of many {}.",
    "{}",
)


@dataclass
class ModelConfig:
    """Everything besides the weights that a TTD model, its exports and its runtimes need."""

    name: str
    model_cfg: dict[str, Any]
    tokenizer: dict[str, Any]
    source: str = "random-init"
    dense_mode: str = "clearclip"
    image_size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    prompt_templates: tuple[str, ...] = DEFAULT_TEMPLATES
    tau: float = 100.0
    mask_weight_init: float = 10.0
    mask_bias_init: float = -2.5
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def grid_size(self) -> tuple[int, int]:
        patch = self.model_cfg["vision_cfg"]["patch_size"]
        return self.image_size // patch, self.image_size // patch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        data = dict(data)
        for key in ("mean", "std", "prompt_templates"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


class TTDModel(nn.Module):
    """CLIP + dense features + mask calibration. Embeddings it returns are L2-normalised."""

    def __init__(self, config: ModelConfig, clip: CLIP) -> None:
        super().__init__()
        if config.dense_mode not in DENSE_MODES:
            raise ValueError(f"unknown dense mode {config.dense_mode!r}; choose one of {', '.join(DENSE_MODES)}")
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
