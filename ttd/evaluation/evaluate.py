"""Evaluation of a TTD model on samples with ground truth (docs/architecture.md §3.5): tag metrics for each
scorer, caption-mask metrics. Runs through the runtime Tagger, so what is measured is what
`ttd tag` runs, on any backend (`ttd eval --backend onnxruntime --export-dir DIR`)."""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ttd.model.config import DEFAULT_MASK_THRESHOLD, DEFAULT_THRESHOLD
from ttd.data.annotations import EvalSample
from ttd.evaluation.metrics import MaskCounts, TagCounts
from ttd.model.clip import TTDModel
from ttd.model.contract import SCORE_ROWS
from ttd.model.scoring import global_tag_scores
from ttd.runtime.tagger import Tagger
from ttd.evaluation.tag_kinds import KINDS, KindCounts
from ttd.model.tags import candidate_tags

SCORERS = ("image-tag", "text-tag", "pixel-tag", "pixel-tag-minmax", "pixel-tag-sigmoid", "pixel-tag-negatives")
PIXEL_SCORERS = {"pixel-tag": "softmax", "pixel-tag-minmax": "minmax", "pixel-tag-sigmoid": "sigmoid",
                 "pixel-tag-negatives": "negatives"}


def _caption_masks(tagger: Tagger, views: np.ndarray, text_embeds: np.ndarray, size: int,
                   mask_threshold: float) -> np.ndarray:
    """Binary caption masks M_c ≥ θ at the image size: the tag head with the caption as the one
    tag, its logits w·cos + b upsampled bilinearly."""
    request = tagger.request([["caption"]] * len(views), with_cosines=True)
    request = dataclasses.replace(request, tag_embeds=text_embeds[:, None, :].astype(np.float32))
    cosines = tagger.score_views(views, request).tag_cosines[:, 0]
    logits = tagger.mask_weight * cosines + tagger.mask_bias
    upsampled = F.interpolate(torch.from_numpy(logits[:, None]).float(), size=(size, size), mode="bilinear",
                              align_corners=False)
    return (torch.sigmoid(upsampled[:, 0]) >= mask_threshold).numpy()


def _global_scores(embeds: np.ndarray, tag_embeds: np.ndarray, valid: np.ndarray, tau: float) -> np.ndarray:
    return global_tag_scores(torch.from_numpy(embeds).float(), torch.from_numpy(tag_embeds), tau,
                             torch.from_numpy(valid)).numpy()


def evaluate(
    model: TTDModel | Tagger,
    samples: Sequence[EvalSample],
    threshold: float = DEFAULT_THRESHOLD,
    mask_threshold: float = DEFAULT_MASK_THRESHOLD,
    batch_size: int = 64,
    flip_tta: bool = False,
    progress: bool = True,
    tag_groups: dict[str, str] | None = None,
) -> dict:
    """{"tags": {scorer: metrics}, "caption_mask": {...}, "samples": n, "candidates": n}.

    `model`: a Tagger on any backend (its own flip TTA setting applies), or a TTDModel, run by
    the torch backend on its device with `flip_tta`. `tag_groups` (tag -> group name) adds
    "pixel-tag by group": the pixel-tag metrics of each group of tags."""
    if isinstance(model, TTDModel):
        from ttd.runtime import torch_tagger

        model = torch_tagger(model, device=str(model.device), flip_tta=flip_tta)
    tagger = model
    counts = {name: TagCounts() for name in SCORERS}
    kinds = {name: KindCounts() for name in SCORERS}
    by_group: dict[str, TagCounts] = {}
    masks = MaskCounts()
    tau = tagger.config.tau
    n_candidates = 0
    for start in tqdm(range(0, len(samples), batch_size), disable=not progress, desc="eval"):
        batch = samples[start : start + batch_size]
        tag_lists = [candidate_tags(s.caption) for s in batch]
        image_embeds, views = tagger.encode_images(np.stack([s.image for s in batch]))
        text_embeds = tagger.encode_texts([s.caption for s in batch])
        request = tagger.request(tag_lists)  # one head call per batch: padded lists are exact for every score
        head_scores = tagger.score_views(views, request).tag_scores
        scores = {name: head_scores[:, SCORE_ROWS.index(method)] for name, method in PIXEL_SCORERS.items()}
        scores["image-tag"] = _global_scores(image_embeds, request.tag_embeds, request.tag_valid, tau)
        scores["text-tag"] = _global_scores(text_embeds, request.tag_embeds, request.tag_valid, tau)
        for row, tags in enumerate(tag_lists):
            relevant = np.array([t in batch[row].relevant_tags for t in tags])
            n_candidates += len(tags)
            if not tags:
                continue
            for name in SCORERS:
                counts[name].add(scores[name][row, : len(tags)], relevant, threshold)
                kinds[name].add(tags, scores[name][row, : len(tags)] >= threshold, relevant)
            for k, tag in enumerate(tags if tag_groups else []):
                group = by_group.setdefault(tag_groups.get(tag, "other"), TagCounts())
                group.add(scores["pixel-tag"][row, k : k + 1], relevant[k : k + 1], threshold)
        predicted = _caption_masks(tagger, views, text_embeds, tagger.config.image_size, mask_threshold)
        for row, sample in enumerate(batch):
            if sample.caption_mask is not None:
                masks.add(predicted[row], sample.caption_mask)
    return {
        "samples": len(samples),
        "candidates": n_candidates,
        "threshold": threshold,
        "tags": {name: c.summary() for name, c in counts.items()},
        "caption_mask": masks.summary(),
        "by kind": {name: k.summary() for name, k in kinds.items()},
        **({"pixel-tag by group": {g: c.summary() for g, c in sorted(by_group.items())}} if tag_groups else {}),
    }


def evaluate_model(settings: dict, data_dir: Path | None = None, count: int = 500, seed: int = 2,
                   batch_size: int = 64, log: Callable[[str], None] | None = None) -> dict:
    """`evaluate` of the model `settings` name (`ttd.load`'s keyword arguments) on a labelled folder,
    or on `count` world samples of `seed`: what `ttd eval` runs. Skipped samples go to `log`."""
    from ttd.api import load
    from ttd.data.annotations import labelled_samples

    loaded = load(**settings)
    skipped: list[str] = []
    samples = labelled_samples(data_dir, loaded.runtime.preprocess, seed, count, skipped)
    for reason in skipped:
        (log or (lambda line: None))(f"skipped {reason}")
    result = evaluate(loaded.runtime, samples, loaded.threshold, loaded.mask_threshold, batch_size)
    return {**result, "skipped": skipped, "model": loaded.config.source, "backend": loaded.backend}


def format_table(result: dict) -> str:
    """The evaluation as a terminal table (percentages)."""
    lines = [f"{'scorer':<20}{'P':>7}{'R':>7}{'F1':>7}{'Acc':>7}{'mAP':>7}{'R-P':>7}"]
    for name, m in result["tags"].items():
        lines.append(f"{name:<20}" + "".join(f"{100 * m[k]:>7.1f}" for k in
                                              ("precision", "recall", "f1", "accuracy", "map", "r_precision")))
    if "by kind" in result:
        lines.append("recall by kind of tag (absent: share selected, lower is better)")
        lines.append(f"{'scorer':<20}" + "".join(f"{k:>11}" for k in KINDS))
        for name, by_kind in result["by kind"].items():
            cells = [by_kind[k].get("recall", by_kind[k].get("selected")) for k in KINDS]
            lines.append(f"{name:<20}" + "".join(f"{'n/a' if v is None else f'{100 * v:.1f}':>11}" for v in cells))
    cm = result["caption_mask"]
    lines.append(f"caption mask: IoU {100 * cm['iou']:.1f}  FPR {100 * cm['fpr']:.1f}  FNR {100 * cm['fnr']:.1f}"
                 f"   ({result['samples']} samples, {result['candidates']} candidate tags, δ={result['threshold']})")
    return "\n".join(lines)
