"""LoRA adapters as torch parametrizations: W' = W + (alpha/rank)·B·A on chosen weights.

A parametrization works for nn.Linear weights and for nn.MultiheadAttention's fused
`in_proj_weight` alike, and every consumer (open_clip's blocks, the dense modes) sees the
adapted weight without knowing about LoRA. Merging bakes W' in and removes the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ttd.errors import InputError
from ttd.model.clip import TTDModel

LORA_TARGETS = ("attn", "mlp")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    towers: tuple[str, ...] = ("vision", "text")

    def to_dict(self) -> dict:
        return asdict(self)


class LoRADelta(nn.Module):
    """weight -> weight + scale·B·A; B starts at zero so the adapted model equals the base."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_b @ self.lora_a).to(weight.dtype) * self.scale


def _target_weights(model: TTDModel, config: LoRAConfig) -> Iterator[tuple[nn.Module, str]]:
    towers = {"vision": model.clip.visual.transformer, "text": model.clip.transformer}
    for tower in config.towers:
        if tower not in towers:
            raise InputError(f"unknown LoRA tower {tower!r}; choose from {', '.join(towers)}")
        for block in towers[tower].resblocks:
            if "attn" in config.targets:
                yield block.attn, "in_proj_weight"
                yield block.attn.out_proj, "weight"
            if "mlp" in config.targets:
                yield block.mlp.c_fc, "weight"
                yield block.mlp.c_proj, "weight"
    unknown = set(config.targets) - set(LORA_TARGETS)
    if unknown:
        raise InputError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(LORA_TARGETS)}")


def inject_lora(model: TTDModel, config: LoRAConfig) -> list[nn.Parameter]:
    """Freeze the base, add adapters; returns the trainable parameters (adapters + mask w, b)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module, name in _target_weights(model, config):
        out_features, in_features = getattr(module, name).shape
        delta = LoRADelta(out_features, in_features, config.rank, config.alpha).to(getattr(module, name).device)
        parametrize.register_parametrization(module, name, delta)
    model.mask_weight.requires_grad_(True)
    model.mask_bias.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def has_lora(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Bake every adapter into its weight (in place) so the model is a plain open_clip model again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the model would have with every adapter merged, without changing the model.

    (Merging a deep copy is not an option: parametrized modules of a copy share their dynamically
    created class with the original, and removing a parametrization edits that class.)"""
    merged = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key:
            merged[key] = value.detach().clone()
        elif key.endswith(".original"):
            module_path, name = key.split(".parametrizations.")
            name = name[: -len(".original")]
            module = model.get_submodule(module_path)
            with torch.no_grad():
                merged[f"{module_path}.{name}"] = getattr(module, name).detach().clone()
    return merged


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter matrices and the mask calibration: what TTD fine-tuning changed."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if ".lora_a" in k or ".lora_b" in k or k in ("mask_weight", "mask_bias")
    }
