"""The batch job behind `ttd segment`: caption masks (captions file) or semantic segmentation
(images + class names) of many images, one JSON line per item in input order, masks as RLE in
the lines and optionally as COCO JSON and PNG files. A bad item becomes an error record; the
others are still segmented.

Record: {"image", "width", "height", ["caption"], "candidates": [{"tag", "score"}], "selected",
"segments": [{"label", "kind", "score", "area", "rle"}], ["masks": {label: png}], ["label_map": png]}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ttd.jobs.coco import encode_rle, write_coco
from ttd.data.voc import PALETTE_SIZE, palette
from ttd.runtime.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from ttd.data.inputs import Item
from ttd.runtime.tagger import Tagger
from ttd.segment.segmentation import SegmentOptions, Segmentation, segment_caption, segment_classes
from ttd.jobs.tag_job import MAX_CAPTION_TAGS, contained_path, partial_path, refuse_input_as_output, safe_name
from ttd.model.tags import candidate_tags



@dataclass
class SegmentSummary:
    written: int = 0
    errors: int = 0


def save_label_map(labels: np.ndarray, path: Path) -> None:
    """A uint16 label map as a palette PNG (≤ 255 classes) or 16-bit greyscale PNG."""
    if labels.max(initial=0) < PALETTE_SIZE:
        png = Image.fromarray(labels.astype(np.uint8), "P")
        png.putpalette(palette())
    else:
        png = Image.fromarray(labels.astype(np.uint16))
    png.save(path)


def to_record(item: Item, result: Segmentation) -> dict:
    record: dict = {"image": item.image, "width": result.width, "height": result.height}
    if result.classes is None:
        record["caption"] = item.caption
    record["candidates"] = [{"tag": t, "score": round(s, 6)} for t, s in result.candidates]
    record["selected"] = result.selected
    record["segments"] = [{"label": s.label, "kind": s.kind, "score": round(s.score, 6), "area": int(s.mask.sum()),
                           "rle": encode_rle(s.mask)} for s in result.segments]
    return record


def _write_pngs(masks_dir: Path, index: int, item: Item, result: Segmentation) -> dict:
    folder = contained_path(masks_dir, f"{index:06d}_{safe_name(Path(item.image).stem)}")
    folder.mkdir(parents=True, exist_ok=True)
    written: dict = {"masks": {}}
    for position, segment in enumerate(result.segments):
        path = contained_path(folder, f"{position:04d}_{segment.kind}_{safe_name(segment.label)}.png")
        Image.fromarray(segment.mask.astype(np.uint8) * 255, "L").save(path)
        written["masks"][segment.label] = str(path)
    if result.label_map is not None:
        path = contained_path(folder, "label_map.png")
        save_label_map(result.label_map, path)
        written["label_map"] = str(path)
    return written


def segment_one(tagger: Tagger, item: Item, classes: list[str] | None, class_embeds: np.ndarray | None,
                options: SegmentOptions, max_pixels: int) -> Segmentation:
    if item.error:
        raise ValueError(item.error)
    if classes is None and (item.caption is None or not item.caption.strip()):
        raise ValueError("empty caption")
    if classes is None and len(candidate_tags(item.caption)) > MAX_CAPTION_TAGS:
        raise ValueError(f"caption has more than {MAX_CAPTION_TAGS} candidate tags; split it into shorter captions")
    image = decode_image(item.path, item.image, max_pixels)
    if classes is not None:
        return segment_classes(tagger, image, classes, options, class_embeds)
    return segment_caption(tagger, image, item.caption, options)


def segment_items(tagger: Tagger, items: list[Item], output: Path, classes: list[str] | None = None,
                  options: SegmentOptions = SegmentOptions(), coco: Path | None = None,
                  masks_dir: Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True,
                  inputs: Sequence[Path] = ()) -> SegmentSummary:
    """Segment `items` into `output` (JSON lines via `<output>.partial`), plus COCO JSON and PNGs
    if asked. With `classes`, semantic segmentation; otherwise each item's caption."""
    refuse_input_as_output(output, items, inputs)
    if coco is not None:
        refuse_input_as_output(coco, items, inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    class_embeds = tagger.encode_tags(classes) if classes else None
    summary = SegmentSummary()
    records = []
    partial = partial_path(output)
    with partial.open("w", encoding="utf-8") as out:
        for index, item in enumerate(tqdm(items, disable=not progress, unit="img", desc="segment")):
            try:
                result = segment_one(tagger, item, classes, class_embeds, options, max_pixels)
                record = to_record(item, result)
            except (ImageError, ValueError, OSError) as error:
                record = {"image": item.image, **({"caption": item.caption} if classes is None else {}),
                          "error": str(error)}
            else:
                if masks_dir is not None:
                    try:
                        record.update(_write_pngs(masks_dir, index, item, result))
                    except (OSError, ValueError) as error:
                        record["error"] = f"cannot write masks: {error}"
            summary.errors += "error" in record
            summary.written += 1
            out.write(json.dumps(record) + "\n")
            out.flush()
            if coco is not None:
                records.append(record)
    os.replace(partial, output)
    if coco is not None:
        write_coco(records, coco)
    return summary
