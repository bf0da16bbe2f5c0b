"""Dense (per-patch) features for open_clip ViT towers (docs/architecture.md §3.1).

The tower runs once up to its last block; the unmodified last block gives the global embedding,
and the dense mode decides what the last block does for the patch tokens:

- ``avg``: nothing changes (towers trained with average pooling already align patches with text);
- ``maskclip``: every token attends only to itself (attention output = out_proj(v)), residual
  and MLP kept;
- ``clearclip``: q-q self-attention, no residual, no MLP.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from ttd.errors import InputError
from ttd.model.config import DENSE_MODES

DenseMode = Literal["avg", "maskclip", "clearclip"]


def check_supported(visual: torch.nn.Module) -> VisionTransformer:
    """The tower, if it is a plain open_clip ViT; a clear error otherwise."""
    if not isinstance(visual, VisionTransformer):
        raise InputError(
            f"dense features need an open_clip VisionTransformer tower, got {type(visual).__name__} "
            "(timm, ResNet and HF towers are not supported)"
        )
    if visual.attn_pool is not None:
        raise InputError("dense features are not defined for attention-pooled towers (CoCa-style)")
    if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
        raise InputError("dense features need open_clip's standard ResidualAttentionBlock blocks")
    if not visual.transformer.batch_first:
        raise InputError("dense features need a batch-first transformer (open_clip >= 2.24)")
    return visual


def _qkv(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = block.ln_1(x)
    return F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)


def maskclip_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Last block with self-only attention: attention output = out_proj(v)."""
    _, _, v = _qkv(block, x)
    x = x + block.ls_1(block.attn.out_proj(v))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def clearclip_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Last block with q-q attention and neither residual nor MLP."""
    q, _, v = _qkv(block, x)
    batch, tokens, width = q.shape
    heads = block.attn.num_heads
    q = q.reshape(batch, tokens, heads, width // heads).transpose(1, 2)
    v = v.reshape(batch, tokens, heads, width // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, q, v)
    return block.attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


def encode_image_dense(
    visual: VisionTransformer, pixel_values: torch.Tensor, mode: DenseMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global embedding [B, D], patch embeddings [B, D, h, w]); neither is normalised."""
    if mode not in DENSE_MODES:
        raise InputError(f"unknown dense mode {mode!r}; choose one of {', '.join(DENSE_MODES)}")
    x = visual._embeds(pixel_values)
    *blocks, last = visual.transformer.resblocks
    # open_clip's gradient checkpointing (set_grad_checkpointing), which its own forward applies and
    # this one must too: each block's activations are recomputed in the backward pass instead of kept
    recompute = getattr(visual.transformer, "grad_checkpointing", False) and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    full = checkpoint(last, x, use_reentrant=False) if recompute else last(x)
    pooled, _ = visual._pool(full)
    image_embeds = pooled @ visual.proj
    if mode == "avg":
        dense = full
    elif mode == "maskclip":
        dense = maskclip_block(last, x)
    else:
        dense = clearclip_block(last, x)
    patch = visual.ln_post(dense[:, 1:]) @ visual.proj
    grid_h, grid_w = visual.grid_size
    patch_embeds = patch.transpose(1, 2).reshape(patch.shape[0], patch.shape[2], grid_h, grid_w)
    return image_embeds, patch_embeds
