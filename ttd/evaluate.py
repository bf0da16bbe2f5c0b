"""Evaluation of a TTD model on samples with ground truth (DESIGN §3.5): tag metrics for each
scorer, caption-mask metrics. Runs the torch model directly, batch by batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ttd.data.annotations import EvalSample
from ttd.images import normalize
from ttd.metrics import MaskCounts, TagCounts
from ttd.model import TTDModel
from ttd.scoring import global_tag_scores, pad_tags, pixel_tag_scores
from ttd.tags import candidate_tags

SCORERS = ("image-tag", "text-tag", "pixel-tag", "pixel-tag-minmax", "pixel-tag-sigmoid")


@torch.inference_mode()
def evaluate(
    model: TTDModel,
    samples: Sequence[EvalSample],
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    batch_size: int = 64,
    flip_tta: bool = False,
    progress: bool = True,
    tag_groups: dict[str, str] | None = None,
) -> dict:
    """{"tags": {scorer: metrics}, "caption_mask": {...}, "samples": n, "candidates": n}.

    `tag_groups` (tag -> group name) adds "pixel-tag by group": the pixel-tag metrics of each
    group of tags, to see which kinds of tags a model misses."""
    model.eval()
    counts = {name: TagCounts() for name in SCORERS}
    by_group: dict[str, TagCounts] = {}
    masks = MaskCounts()
    tau, weight, bias = model.config.tau, model.mask_weight, model.mask_bias
    n_candidates = 0
    for start in tqdm(range(0, len(samples), batch_size), disable=not progress, desc="eval"):
        batch = samples[start : start + batch_size]
        tag_lists = [candidate_tags(s.caption) for s in batch]
        images = np.stack([s.image for s in batch])
        pixels = torch.from_numpy(normalize(images, model.config.mean, model.config.std)).to(model.device)
        image_embeds, patch_embeds = model.encode_image(pixels)
        flipped = model.encode_image(pixels.flip(-1))[1] if flip_tta else None
        text_embeds = model.encode_texts([s.caption for s in batch])
        unique, index, valid = pad_tags(tag_lists)
        tag_embeds = model.encode_tags(unique)[index.to(model.device)] if unique else None
        if tag_embeds is not None:
            valid = valid.to(model.device)
            scores = {
                "image-tag": global_tag_scores(image_embeds, tag_embeds, tau, valid),
                "text-tag": global_tag_scores(text_embeds, tag_embeds, tau, valid),
            }
            for name, method in (("pixel-tag", "softmax"), ("pixel-tag-minmax", "minmax"), ("pixel-tag-sigmoid", "sigmoid")):
                scores[name] = pixel_tag_scores(patch_embeds, tag_embeds, tau, valid, method, weight, bias, flipped)
            for row, (sample, tags) in enumerate(zip(batch, tag_lists)):
                if not tags:
                    continue
                relevant = np.array([t in sample.relevant_tags for t in tags])
                n_candidates += len(tags)
                for name in SCORERS:
                    counts[name].add(scores[name][row, : len(tags)].float().cpu().numpy(), relevant, threshold)
                pixel = scores["pixel-tag"][row, : len(tags)].float().cpu().numpy()
                for k, tag in enumerate(tags if tag_groups else []):
                    group = by_group.setdefault(tag_groups.get(tag, "other"), TagCounts())
                    group.add(pixel[k : k + 1], relevant[k : k + 1], threshold)
        caption_logits = weight * torch.einsum("bdhw,bd->bhw", patch_embeds, text_embeds) + bias
        size = model.config.image_size
        upsampled = F.interpolate(caption_logits[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
        predicted = (torch.sigmoid(upsampled[:, 0]) >= mask_threshold).cpu().numpy()
        for row, sample in enumerate(batch):
            if sample.caption_mask is not None:
                masks.add(predicted[row], sample.caption_mask)
    return {
        "samples": len(samples),
        "candidates": n_candidates,
        "threshold": threshold,
        "tags": {name: c.summary() for name, c in counts.items()},
        "caption_mask": masks.summary(),
        **({"pixel-tag by group": {g: c.summary() for g, c in sorted(by_group.items())}} if tag_groups else {}),
    }


def format_table(result: dict) -> str:
    """The evaluation as a terminal table (percentages)."""
    lines = [f"{'scorer':<20}{'P':>7}{'R':>7}{'F1':>7}{'Acc':>7}{'mAP':>7}{'R-P':>7}"]
    for name, m in result["tags"].items():
        lines.append(f"{name:<20}" + "".join(f"{100 * m[k]:>7.1f}" for k in
                                              ("precision", "recall", "f1", "accuracy", "map", "r_precision")))
    cm = result["caption_mask"]
    lines.append(f"caption mask: IoU {100 * cm['iou']:.1f}  FPR {100 * cm['fpr']:.1f}  FNR {100 * cm['fnr']:.1f}"
                 f"   ({result['samples']} samples, {result['candidates']} candidate tags, δ={result['threshold']})")
    return "\n".join(lines)
