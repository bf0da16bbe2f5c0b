"""Open-vocabulary semantic segmentation measured per class (docs/architecture.md §3.5): mIoU / mFPR / mFNR of
the label maps `ttd segment --classes` makes, on a VOC-style folder or the world split.

Label 0 of a dataset is the background: it is the θ channel, not a text class; classes 1..N go
through the prompt-template ensemble. Predictions are made at the image's own size (whole-image
inference), so ground truth is never resized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ttd.data.voc import IGNORE_INDEX, SegmentationSet
from ttd.evaluation.metrics import SegmentationCounts
from ttd.runtime.tagger import Tagger
from ttd.segment.segmentation import SegmentOptions, class_maps, encode


def evaluate_segmentation(tagger: Tagger, dataset: SegmentationSet, options: SegmentOptions = SegmentOptions(),
                          progress: bool = True) -> dict:
    """{"classes": {name: {"iou", "fpr", "fnr", "pixels"}}, "miou", "mfpr", "mfnr", "pixel_accuracy", ...}."""
    text_classes = dataset.classes[1:]
    embeds = tagger.encode_tags(text_classes)
    counts = SegmentationCounts(len(dataset.classes), IGNORE_INDEX)
    for index in tqdm(range(len(dataset)), disable=not progress, desc="segment"):
        image, truth = dataset.load(index)
        maps = class_maps(tagger, encode(tagger, image, options), text_classes, options, embeds)
        counts.add(maps.label_map(options.mask_threshold), truth)
    per = counts.per_class()
    none = lambda v: None if np.isnan(v) else round(float(v), 6)  # noqa: E731
    return {
        **counts.summary(),
        "classes": {name: {"iou": none(per["iou"][i]), "fpr": none(per["fpr"][i]), "fnr": none(per["fnr"][i]),
                           "pixels": int(per["pixels"][i])} for i, name in enumerate(dataset.classes)},
        "samples": len(dataset),
        "dataset": dataset.source,
        "options": {"crop": options.crop, "scales": list(options.scales), "stride": options.stride,
                    "mask_threshold": options.mask_threshold, "pamr": options.pamr, "flip_tta": tagger.flip_tta},
    }


def evaluate_model_segmentation(settings: dict, dataset: SegmentationSet, options: SegmentOptions,
                                templates: Path | None = None) -> dict:
    """`evaluate_segmentation` of the model `settings` name (`ttd.load`'s keyword arguments), with
    prompt templates from a file if given: what `ttd eval-segmentation` runs."""
    from ttd.api import load
    from ttd.segment.segmentation import read_templates, with_templates

    tagger = load(**settings).runtime
    if templates is not None:
        tagger = with_templates(tagger, read_templates(Path(templates).read_text(encoding="utf-8")))
    return {**evaluate_segmentation(tagger, dataset, options), "model": tagger.config.source}


def format_segmentation_table(result: dict) -> str:
    """Per-class IoU / FPR / FNR (percent) and the means, as a terminal table."""
    cell = lambda v: f"{100 * v:>7.1f}" if v is not None else f"{'-':>7}"  # noqa: E731
    lines = [f"{'class':<16}{'IoU':>7}{'FPR':>7}{'FNR':>7}{'pixels':>10}"]
    for name, m in result["classes"].items():
        lines.append(f"{name:<16}{cell(m['iou'])}{cell(m['fpr'])}{cell(m['fnr'])}{m['pixels']:>10}")
    lines.append(f"{'mean':<16}{cell(result['miou'])}{cell(result['mfpr'])}{cell(result['mfnr'])}"
                 f"   ({result['samples']} images, {result['dataset']})")
    return "\n".join(lines)
