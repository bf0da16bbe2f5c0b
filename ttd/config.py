"""ModelConfig: everything besides the weights that a TTD model, its exports and its runtimes
need. Free of torch, so that runtimes (the Triton Python backend among them) can import it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCORE_METHODS: tuple[str, ...] = ("softmax", "minmax", "sigmoid")
DENSE_MODES: tuple[str, ...] = ("avg", "maskclip", "clearclip")

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
