"""The batch job behind `ttd segment`: caption masks (captions file) or semantic segmentation
(images + class names) of many images, one JSON line per item in input order, masks as RLE in
the lines and optionally as COCO JSON and PNG files. A bad item becomes an error record; the
others are still segmented.

Record: {"image", "width", "height", ["caption"], "candidates": [{"tag", "score"}], "selected",
"segments": [{"label", "kind", "score", "area", "rle"}], ["masks": {label: png}], ["label_map": png]}.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
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
from ttd.data.items import check_shard, select_shard
from ttd.jobs.jsonl_output import error_kind, output_format_of
from ttd.jobs.outputs import open_output
from ttd.jobs.stream_job import CountedItems, JobSummary, refuse_no_items, refusing_output
from ttd.jobs.tag_job import MAX_CAPTION_TAGS, contained_path, refuse_input_as_output, safe_name
from ttd.model.tags import candidate_tags



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
    data = getattr(item, "data", None)  # a webdataset sample's own image bytes (ttd.data.items.ShardItem)
    image = decode_image(item.path if data is None else data, item.image, max_pixels)
    if classes is not None:
        return segment_classes(tagger, image, classes, options, class_embeds)
    return segment_caption(tagger, image, item.caption, options)


def segment_record(tagger: Tagger, position: int, item: Item, classes: list[str] | None,
                   class_embeds: np.ndarray | None, options: SegmentOptions, max_pixels: int,
                   masks_dir: Path | None) -> dict:
    """The output line of one item: its segmentation, or the error that names its problem."""
    try:
        result = segment_one(tagger, item, classes, class_embeds, options, max_pixels)
        record = to_record(item, result)
    except (ImageError, ValueError, OSError) as error:
        return {"index": position, "image": item.image, **({"caption": item.caption} if classes is None else {}),
                "error": str(error)}
    if masks_dir is not None:
        try:  # folders named by global position: shards writing one masks folder never collide
            record.update(_write_pngs(masks_dir, position, item, result))
        except (OSError, ValueError) as error:
            record["error"] = f"cannot write masks: {error}"
    return {"index": position, **record}


def segment_items(tagger: Tagger, items: Iterable[Item], output: Path, classes: list[str] | None = None,
                  options: SegmentOptions = SegmentOptions(), coco: Path | None = None,
                  masks_dir: Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True,
                  inputs: Sequence[Path] = (), resume: bool = False, shard: int = 0, num_shards: int = 1,
                  job: dict | None = None) -> JobSummary:
    """Segment a stream of `items` into `output` (JSON lines, each with its input `index`), plus
    COCO JSON and PNGs if asked. With `classes`, semantic segmentation; otherwise each item's
    caption. The output is the exactly-once writer of `ttd tag` (ttd/jobs/jsonl_output.py), so
    `resume` and `shard`/`num_shards` behave as there; the inputs are never taken as the output."""
    output = Path(output)
    check_shard(shard, num_shards)
    refuse_input_as_output(output, [], inputs)
    if coco is not None:
        refuse_input_as_output(coco, [], inputs)
    if output_format_of(output) == "parquet":
        raise ValueError(f"{output}: segmentation records hold masks as RLE segments; they are written as JSON lines "
                         "(Parquet output is for `ttd tag --crop center`)")
    class_embeds = tagger.encode_tags(classes) if classes else None
    description = {**(job or {}), "mode": "segment", "classes": classes, "options": dataclasses.asdict(options),
                   "masks_dir": str(masks_dir) if masks_dir else None, "max_pixels": max_pixels,
                   "shard": shard, "num_shards": num_shards}
    writer = open_output(output, description, resume)
    summary = JobSummary(output, writer.done.lines, writer.done.lines, Counter(writer.done.errors))
    started = time.perf_counter()
    try:
        if writer.complete:
            summary.already_complete = True
        else:
            counted = CountedItems(refusing_output(items, output))
            stream = select_shard(counted, shard, num_shards, skip=summary.resumed)
            for position, item in tqdm(stream, disable=not progress, unit="img", desc="segment", initial=summary.resumed):
                record = segment_record(tagger, position, item, classes, class_embeds, options, max_pixels, masks_dir)
                writer.write([record])
                summary.items += 1
                if "error" in record:
                    summary.errors[error_kind(str(record["error"]))] += 1
            refuse_no_items(counted, output)
            writer.finish()
    finally:
        writer.close()
        summary.seconds = time.perf_counter() - started
    if coco is not None:
        with output.open(encoding="utf-8") as lines:
            write_coco([json.loads(line) for line in lines if line.strip()], coco)
    return summary
