"""Stage 2 of TTD (DESIGN §3.4): targets from the selected tags, and the losses.

L = L_distill + λ_tag·L_tag + λ_clip·L_infonce, where the caption mask M_c learns the union U of
the selected tags' masks, and each tag mask M_k learns its own min-max normalised map (selected)
or zero (rejected). Targets are computed without gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ttd.model.config import DEFAULT_NEGATIVE_MARGIN
from ttd.model.scoring import minmax_over_pixels, pixel_cosines, score_row, select_tags, tag_head


@dataclass
class DistillLosses:
    total: torch.Tensor
    distill: torch.Tensor
    tag: torch.Tensor
    clip: torch.Tensor
    selected_fraction: float

    def as_floats(self) -> dict[str, float]:
        return {"loss": self.total.item(), "distill": self.distill.item(), "tag": self.tag.item(),
                "clip": self.clip.item(), "selected": self.selected_fraction}


def distill_targets(
    tag_logits: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y [B, K, h, w], U [B, h, w]) from mask logits and the selection [B, K], without gradient."""
    with torch.no_grad():
        tag_targets = minmax_over_pixels(torch.sigmoid(tag_logits)) * selected[:, :, None, None]
        union = tag_targets.amax(dim=1)
    return tag_targets, union


def stage1_scores(patch_embeds: torch.Tensor, tag_embeds: torch.Tensor, valid: torch.Tensor, tau: float,
                  score_method: str, mask_weight: torch.Tensor, mask_bias: torch.Tensor,
                  negative_embeds: torch.Tensor | None, negative_margin: float) -> torch.Tensor:
    """Stage 1's scores [B, K] by the one scoring function (ttd.model.scoring.tag_head)."""
    if negative_embeds is None:
        if score_method == "negatives":
            raise ValueError("the negatives Stage-1 score needs negative_embeds (the negative prompts, encoded)")
        negative_embeds = patch_embeds.new_zeros(1, patch_embeds.shape[1])  # its row is not read
    margin = patch_embeds.new_tensor([float(negative_margin)])
    tag_scores, _ = tag_head(patch_embeds[:, None], tag_embeds, valid, negative_embeds.detach()[None], margin, tau,
                             mask_weight, mask_bias)
    return score_row(tag_scores, score_method)


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (embeddings already gathered across ranks if distributed)."""
    logits = logit_scale.exp() * image_embeds @ text_embeds.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def ttd_losses(
    patch_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    tag_embeds: torch.Tensor,
    valid: torch.Tensor,
    mask_weight: torch.Tensor,
    mask_bias: torch.Tensor,
    clip_term: torch.Tensor,
    tau: float,
    threshold: float,
    lambda_tag: float,
    lambda_clip: float,
    score_method: str = "softmax",
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    normaliser: Callable[[torch.Tensor], torch.Tensor] | None = None,
    negative_embeds: torch.Tensor | None = None,
    negative_margin: float = DEFAULT_NEGATIVE_MARGIN,
) -> DistillLosses:
    """The TTD loss of a batch. `teacher` = (patch_embeds, tag_embeds) of a frozen teacher; the
    default online teacher is the current model without gradient.

    `normaliser` turns a local count (candidates, captions with a selection) into the divisor of
    the local sum; distributed training passes global count / world size, so that averaging the
    ranks' gradients gives exactly the gradient of one process over the whole batch.

    `negative_embeds` [N, D]: the teacher's embeddings of the negative prompts, needed by the
    `negatives` Stage-1 score (ttd/model/scoring.py; the default of TrainConfig). Called directly,
    the function keeps the paper's softmax unless told otherwise."""
    normaliser = normaliser or (lambda count: count)
    teacher_patch, teacher_tags = teacher if teacher is not None else (patch_embeds, tag_embeds)
    with torch.no_grad():
        scores = stage1_scores(teacher_patch.detach(), teacher_tags.detach(), valid, tau, score_method,
                               mask_weight.detach(), mask_bias.detach(), negative_embeds, negative_margin)
        selected = select_tags(scores, threshold, valid)
        teacher_logits = mask_weight.detach() * pixel_cosines(teacher_patch.detach(), teacher_tags.detach()) + mask_bias.detach()
    tag_targets, union = distill_targets(teacher_logits, selected)

    tag_logits = mask_weight * pixel_cosines(patch_embeds, tag_embeds) + mask_bias
    per_tag = F.binary_cross_entropy_with_logits(tag_logits, tag_targets, reduction="none").mean(dim=(2, 3))
    tag_loss = (per_tag * valid).sum() / normaliser(valid.sum().float()).clamp_min(1e-6)

    caption_logits = mask_weight * torch.einsum("bdhw,bd->bhw", patch_embeds, text_embeds) + mask_bias
    has_selection = selected.any(dim=1)
    per_caption = F.binary_cross_entropy_with_logits(caption_logits, union, reduction="none").mean(dim=(1, 2))
    distill_loss = (per_caption * has_selection).sum() / normaliser(has_selection.sum().float()).clamp_min(1e-6)

    total = distill_loss + lambda_tag * tag_loss + lambda_clip * clip_term
    fraction = float(selected.sum()) / max(int(valid.sum()), 1)
    return DistillLosses(total, distill_loss, tag_loss, clip_term, fraction)
