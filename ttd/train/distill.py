"""Stage 2 of TTD (docs/architecture.md §3.4): targets from the selected tags, and the losses.

L = L_distill + λ_tag·L_tag + λ_clip·L_infonce, where the caption mask M_c learns the union U of
the selected tags' masks, and each tag mask M_k learns its own min-max normalised map (selected)
or zero (rejected). Targets are computed without gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ttd.errors import InputError
from ttd.model.config import DEFAULT_MASK_THRESHOLD, DEFAULT_NEGATIVE_MARGIN, TARGET_NORMS
from ttd.model.scoring import minmax_over_pixels, pixel_cosines, score_row, select_tags, tag_head


@dataclass
class DistillLosses:
    total: torch.Tensor
    distill: torch.Tensor
    tag: torch.Tensor
    clip: torch.Tensor
    selected_fraction: float
    diagnostics: dict[str, float] = field(default_factory=dict)

    def as_floats(self) -> dict[str, float]:
        return {"loss": self.total.item(), "distill": self.distill.item(), "tag": self.tag.item(),
                "clip": self.clip.item(), "selected": self.selected_fraction}


def mask_diagnostics(caption_logits: torch.Tensor, union: torch.Tensor, evidence: torch.Tensor,
                     has_selection: torch.Tensor, mask_weight: torch.Tensor, mask_bias: torch.Tensor,
                     mask_threshold: float = DEFAULT_MASK_THRESHOLD) -> dict[str, float]:
    """What a collapse of the caption masks shows, over the pairs with a selection:
    mean area of M_c and of its target U, their shares ≥ θ, the label-free evidence area (pixels
    whose nearest candidate tag is a selected one) and the mask head's w and b.

    The loss alone cannot show it: a caption mask that matches a shrinking target has a *lower*
    distill loss."""
    with torch.no_grad():
        keep = has_selection.float()[:, None, None]
        pairs = keep.sum().clamp_min(1.0) * caption_logits.shape[-1] * caption_logits.shape[-2]
        caption = torch.sigmoid(caption_logits.float())
        return {"caption_area": float((caption * keep).sum() / pairs),
                "caption_above": float(((caption >= mask_threshold).float() * keep).sum() / pairs),
                "target_area": float((union * keep).sum() / pairs),
                "target_above": float(((union >= mask_threshold).float() * keep).sum() / pairs),
                "evidence_area": float((evidence.float() * keep).sum() / pairs),
                "w": float(mask_weight), "b": float(mask_bias)}




def _normalised_maps(tag_logits: torch.Tensor, target_norm: str, mask_share: float, floor: bool) -> torch.Tensor:
    """The per-tag maps [B, K, h, w] that `target_norm` min-max normalises over the pixels."""
    if target_norm not in TARGET_NORMS:
        raise InputError(f"unknown target normalisation {target_norm!r}; choose one of {', '.join(TARGET_NORMS)}")
    mask_logits = tag_logits
    if floor:  # a tag's mean logit below 0 = its mean cosine below the sigmoid's midpoint −b/w: lift it to 0
        mean = tag_logits.mean(dim=(2, 3), keepdim=True)
        mask_logits = tag_logits + (-mean).clamp_min(0.0)
    if target_norm == "mask":
        return minmax_over_pixels(torch.sigmoid(mask_logits))
    if target_norm == "cosine":
        return minmax_over_pixels(tag_logits)
    # mixed: mask_share of the mask's, the rest of the cosine's
    return mask_share * minmax_over_pixels(torch.sigmoid(mask_logits)) + (1 - mask_share) * minmax_over_pixels(tag_logits)


def distill_targets(
    tag_logits: torch.Tensor, selected: torch.Tensor, target_norm: str = "mask", mask_share: float = 0.5,
    caption_norm: str | None = None, floor: bool = False, caption_floor: bool | None = None,
    won: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y [B, K, h, w], U [B, h, w]) from mask logits and the selection [B, K], without gradient.

    `target_norm`: what is min-max normalised over the pixels. `mask` (the paper's): the sigmoid
    mask M_k. `cosine`: the logit w·cos + b, i.e. the cosine itself (w > 0), so the target's shape
    does not depend on where the cosines sit on the sigmoid: once they drift into its lower tail,
    minmax(M_k) is a peak of a few pixels (docs/training.md: the collapse of).

    `caption_norm`: the normalisation of the maps whose union U is the caption's target, when it
    is not `target_norm`: the tag masks make the segmentation, the caption mask the caption IoU,
    and the two need not be trained to the same shape (docs/training.md, "Segmentation too": split).
    `floor`: before the sigmoid, a selected tag whose mean cosine sank below the midpoint −b/w
    has its cosines lifted so that the mean sits on it (docs/training.md, "Segmentation too": floor): the
    collapse follows that mean's fall below the midpoint, though healthy runs end below it too,
    which is why the floor over-corrects (measured there). `caption_floor`: the floor of the
    caption's maps alone (None: `floor`).

    `won` [B, K, h, w] bool (`won_pixels`): the per-pixel blend. Where tag k wins pixel i (its
    nearest candidate tag), Y_k keeps `target_norm`'s map; everywhere else it is the paper's
    min-max of the mask. The anchor then holds exactly where the image-level evidence puts the
    tag, so the union U cannot sink below the evidence (the collapse), while outside it each tag
    mask is sharpened as the paper's (docs/training.md, "Segmentation too": per-pixel)."""
    caption_norm = target_norm if caption_norm is None else caption_norm
    caption_floor = floor if caption_floor is None else caption_floor
    if won is not None and (caption_norm, caption_floor) != (target_norm, floor):
        raise InputError("the per-pixel blend builds the caption's target from the tags' own: give no caption_norm "
                         "or caption_floor of their own with it")
    with torch.no_grad():
        keep = selected[:, :, None, None]
        maps = _normalised_maps(tag_logits, target_norm, mask_share, floor)
        if won is not None:
            maps = torch.where(won, maps, _normalised_maps(tag_logits, "mask", mask_share, floor))
        tag_targets = maps * keep
        if (caption_norm, caption_floor) == (target_norm, floor):
            union = tag_targets.amax(dim=1)
        else:
            union = (_normalised_maps(tag_logits, caption_norm, mask_share, caption_floor) * keep).amax(dim=1)
    return tag_targets, union


def _nearest_tag(cosines: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, h, w]: the index of each pixel's nearest valid candidate tag (argmax_k cos(f_i, e_k))."""
    return cosines.masked_fill(~valid[:, :, None, None], float("-inf")).argmax(dim=1)


def won_pixels(cosines: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, K, h, w] bool: pixel i is tag k's when k is its nearest valid candidate tag."""
    with torch.no_grad():
        nearest = _nearest_tag(cosines, valid)
        return F.one_hot(nearest, cosines.shape[1]).permute(0, 3, 1, 2).bool()


def evidence_map(cosines: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, h, w] bool: pixels whose nearest candidate tag (argmax_k cos(f_i, e_k) over the valid
    tags) is a selected tag. Label-free image-level evidence of how much of the image the caption
    names, and free of w and b: a mask head that shifts its threshold cannot move it."""
    with torch.no_grad():
        nearest = _nearest_tag(cosines, valid)
        return torch.gather(selected.float(), 1, nearest.flatten(1)).view_as(nearest) > 0


def placed_map(teacher_logits: torch.Tensor, selected: torch.Tensor,
               threshold: float = DEFAULT_MASK_THRESHOLD) -> torch.Tensor:
    """[B, h, w] bool: where the selected tags are, by the teacher's own cosine order: pixels where a
    selected tag's min-max normalised logit (w > 0: its cosine's rank over the image, whatever the
    cosines' level against the sigmoid) reaches `threshold`. Unlike `evidence_map`, which gives the
    backdrop to its nearest tag too, it leaves out the pixels no selected tag ranks high."""
    return _selected_rank(teacher_logits, selected) >= threshold


def _selected_rank(teacher_logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """[B, h, w]: the highest min-max normalised logit (cosine order) of a selected tag at each pixel."""
    with torch.no_grad():
        return (minmax_over_pixels(teacher_logits) * selected[:, :, None, None]).amax(dim=1)


def top_placed_map(teacher_logits: torch.Tensor, selected: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """[B, h, w] bool: image b's `pixels[b]` pixels ranked highest by its selected tags (the max over
    them of the teacher's min-max normalised logit, i.e. cosine order). Its size is given, not read
    off the ranks: a tag whose cosines sank to a few peaks still ranks the rest of its pixels."""
    with torch.no_grad():
        ranks = _selected_rank(teacher_logits, selected).flatten(1)
        ordered = ranks.sort(dim=1, descending=True).values
        count = pixels.round().long().clamp(1, ranks.shape[1])
        cut = ordered.gather(1, (count - 1)[:, None])
        return ((ranks >= cut) & (pixels[:, None] >= 0.5)).view(teacher_logits.shape[0], *teacher_logits.shape[2:])


def stage1_scores(patch_embeds: torch.Tensor, tag_embeds: torch.Tensor, valid: torch.Tensor, tau: float,
                  score_method: str, mask_weight: torch.Tensor, mask_bias: torch.Tensor,
                  negative_embeds: torch.Tensor | None, negative_margin: float) -> torch.Tensor:
    """Stage 1's scores [B, K] by the one scoring function (ttd.model.scoring.tag_head)."""
    if negative_embeds is None:
        if score_method == "negatives":
            raise InputError("the negatives Stage-1 score needs negative_embeds (the negative prompts, encoded)")
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
    target_norm: str = "mask",
    mask_share: float = 0.5,
    caption_norm: str | None = None,
    floor: bool = False,
    caption_floor: bool | None = None,
    pixel_mix: bool = False,
    caption_area_floor: float | None = None,
    caption_area_weight: float = 1.0,
    caption_area_ranked: bool = False,
    caption_area_placed: bool = False,
    caption_area_top: bool = False,
) -> DistillLosses:
    """The TTD loss of a batch. `teacher` = (patch_embeds, tag_embeds) of a frozen teacher; the
    default online teacher is the current model without gradient.

    `normaliser` turns a local count (candidates, captions with a selection) into the divisor of
    the local sum; distributed training passes global count / world size, so that averaging the
    ranks' gradients gives exactly the gradient of one process over the whole batch.

    `negative_embeds` [N, D]: the teacher's embeddings of the negative prompts, needed by the
    `negatives` Stage-1 score (ttd/model/scoring.py; the default of TrainConfig). Called directly,
    the function keeps the paper's softmax unless told otherwise.

    `caption_area_floor`: the guard's criterion as a loss. Where an image's caption mask (its mean,
    the soft area) falls below this share of its evidence area (`evidence_map`, label-free), the
    shortfall is added to the loss, so the caption mask cannot sink away from the evidence while
    the tag masks sharpen (docs/training.md, "Segmentation too": area floor). `caption_area_ranked`:
    the area is the mask's mean weighted by the caption's own min-max cosine map (no gradient), so
    that the lift goes to the pixels the caption ranks highest rather than to those nearest the
    sigmoid's midpoint. `caption_area_placed`: a recall floor instead, where the tags are: the
    caption mask's mean over `placed_map` (the teacher's selected tags ranked high; no gradient)
    must reach the floor itself, so the term lifts the caption on the tags' pixels and never on the
    backdrop (docs/training.md, "Segmentation too": placed floor). `caption_area_top`: the floor's
    area, placed: only the caption's mass on the `top_placed_map` pixels (as many as the floor × the
    evidence area, those the selected tags rank highest) counts towards the floor, so the term asks
    the caption to cover exactly them, however far the tags' cosines sank."""
    normaliser = normaliser or (lambda count: count)
    teacher_patch, teacher_tags = teacher if teacher is not None else (patch_embeds, tag_embeds)
    with torch.no_grad():
        scores = stage1_scores(teacher_patch.detach(), teacher_tags.detach(), valid, tau, score_method,
                               mask_weight.detach(), mask_bias.detach(), negative_embeds, negative_margin)
        selected = select_tags(scores, threshold, valid)
        teacher_cosines = pixel_cosines(teacher_patch.detach(), teacher_tags.detach())
        teacher_logits = mask_weight.detach() * teacher_cosines + mask_bias.detach()
    won = won_pixels(teacher_cosines, valid) if pixel_mix else None
    tag_targets, union = distill_targets(teacher_logits, selected, target_norm, mask_share, caption_norm, floor,
                                         caption_floor, won)

    tag_logits = mask_weight * pixel_cosines(patch_embeds, tag_embeds) + mask_bias
    per_tag = F.binary_cross_entropy_with_logits(tag_logits, tag_targets, reduction="none").mean(dim=(2, 3))
    tag_loss = (per_tag * valid).sum() / normaliser(valid.sum().float()).clamp_min(1e-6)

    caption_logits = mask_weight * torch.einsum("bdhw,bd->bhw", patch_embeds, text_embeds) + mask_bias
    has_selection = selected.any(dim=1)
    per_caption = F.binary_cross_entropy_with_logits(caption_logits, union, reduction="none").mean(dim=(1, 2))
    distill_loss = (per_caption * has_selection).sum() / normaliser(has_selection.sum().float()).clamp_min(1e-6)

    total = distill_loss + lambda_tag * tag_loss + lambda_clip * clip_term
    fraction = float(selected.sum()) / max(int(valid.sum()), 1)
    evidence = evidence_map(teacher_cosines, selected, valid)
    area_term, placed_area = None, None
    if caption_area_floor is not None:
        if caption_area_ranked + caption_area_placed + caption_area_top > 1:
            raise InputError("caption_area_ranked, caption_area_placed and caption_area_top are three measures of "
                             "the caption's area: choose one")
        mask = torch.sigmoid(caption_logits)
        if caption_area_placed:  # a recall on the tags' pixels against the floor itself
            placed = placed_map(teacher_logits, selected).float()
            area = (mask * placed).sum(dim=(1, 2)) / placed.sum(dim=(1, 2)).clamp_min(1.0)
            short = (caption_area_floor - area).clamp_min(0.0)
        elif caption_area_top:  # the caption's mass on the tags' top pixels, against the floor's area
            wanted = caption_area_floor * evidence.float().sum(dim=(1, 2))
            placed = top_placed_map(teacher_logits, selected, wanted).float()
            short = (wanted - (mask * placed).sum(dim=(1, 2))).clamp_min(0.0) / mask[0].numel()
        else:
            if caption_area_ranked:
                rank = minmax_over_pixels(caption_logits.detach()[:, None])[:, 0]  # w > 0: the cosine's order
                area = (mask * rank).sum(dim=(1, 2)) / rank.sum(dim=(1, 2)).clamp_min(1e-6)
            else:
                area = mask.mean(dim=(1, 2))
            short = (caption_area_floor * evidence.float().mean(dim=(1, 2)) - area).clamp_min(0.0)
        if caption_area_placed or caption_area_top:
            placed_area = float((placed.mean(dim=(1, 2)) * has_selection).sum() / has_selection.sum().clamp_min(1))
        area_term = (short * has_selection).sum() / normaliser(has_selection.sum().float()).clamp_min(1e-6)
        total = total + caption_area_weight * area_term
    diagnostics = mask_diagnostics(caption_logits, union, evidence, has_selection, mask_weight, mask_bias)
    with torch.no_grad():  # where the selected tags' cosines sit against the sigmoid's midpoint −b/w
        chosen = selected[:, :, None, None].expand_as(teacher_cosines)
        if chosen.any():
            diagnostics["selected_cos_mean"] = float(teacher_cosines[chosen].mean())
            diagnostics["selected_cos_max"] = float(teacher_cosines.amax(dim=(2, 3))[selected].mean())
        diagnostics["mask_midpoint"] = float(-mask_bias.detach() / mask_weight.detach())
        if area_term is not None:
            diagnostics["area_term"] = float(area_term)
        if placed_area is not None:
            diagnostics["placed_area"] = placed_area
    return DistillLosses(total, distill_loss, tag_loss, clip_term, fraction, {**diagnostics, "selected": fraction})
