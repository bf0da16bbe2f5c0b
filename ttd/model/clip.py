"""TTDModel: an open_clip ViT CLIP with dense patch features, tag prompt ensembles and the
learnable mask calibration (w, b) of docs/architecture.md §3.3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from ttd.errors import InputError
from ttd.model.config import DENSE_MODES, ModelConfig
from ttd.model.dense import check_supported, encode_image_dense
from ttd.model.tokenizer import Tokenizer, build_tokenizer


class TTDModel(nn.Module):
    """CLIP + dense features + mask calibration. Embeddings it returns are L2-normalised."""

    # Encode a batch of texts only up to its longest text's pooled token rather than the whole context
    # (77 tokens for open_clip's towers; tag prompts are ~10): with a causal attention mask and the
    # pooled token taken at the end of the text, the tokens after it cannot change it, so the
    # embedding is the same (to float rounding) for a fraction of the memory and time of training
    # (docs/training.md, "Memory"). False: open_clip's own encode_text over the whole context.
    trim_text_context: bool = True

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
        length = self._pooled_context(input_ids)
        if length is None:
            return F.normalize(self.clip.encode_text(input_ids), dim=-1)
        return F.normalize(self.encode_text_prefix(input_ids[:, :length]), dim=-1)

    def _pooled_context(self, input_ids: torch.Tensor) -> int | None:
        """How many leading tokens decide every row's pooled embedding, or None when the tower's
        attention is not causal or it pools somewhere that trimming would move."""
        clip = self.clip
        if not self.trim_text_context or getattr(clip, "attn_mask", None) is None or input_ids.ndim != 2:
            return None
        # training only: a traced graph (ONNX export) would bake the example's length in, and
        # inference keeps open_clip's own arithmetic, so tagging writes the bytes it always wrote
        if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return None
        pool = getattr(clip, "text_pool_type", "argmax")
        if pool == "argmax":  # open_clip pools the highest token id (the end-of-text token)
            return int(input_ids.argmax(dim=-1).max()) + 1
        eos = getattr(clip, "text_eos_id", None)
        if pool == "eos" and eos is not None and bool((input_ids == eos).any(dim=-1).all()):
            return int((input_ids == eos).int().argmax(dim=-1).max()) + 1
        return None

    def encode_text_prefix(self, input_ids: torch.Tensor) -> torch.Tensor:
        """open_clip's CLIP.encode_text (unnormalised) over input_ids' own length, which is at most the
        context: with a causal mask, the positions after a text's pooled token cannot change it."""
        from open_clip.transformer import text_global_pool

        clip, length = self.clip, input_ids.shape[1]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(input_ids).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = text_global_pool(x, input_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return x

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
