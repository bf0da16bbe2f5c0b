"""The batch job behind `ttd segment`: caption masks (captions file) or semantic segmentation
(images + class names) of many images, one JSON line per item in input order, masks as RLE in
the lines and optionally as COCO JSON and PNG files. A bad item becomes an error record; the
others are still segmented.

Record: {"image", "width", "height", ["caption"], "candidates": [{"tag", "score"}], "selected",
"segments": [{"label", "kind", "score", "area", "rle"}], ["masks": {label: png}], ["label_map": png]}.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ttd.errors import InputError
from ttd.jobs.coco import encode_rle, write_coco
from ttd.data.voc import PALETTE_SIZE, palette
from ttd.runtime.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from ttd.data.inputs import Item
from ttd.runtime.tagger import Tagger
from ttd.runtime.texts_ahead import TextsAhead
from ttd.segment.segmentation import SegmentOptions, Segmentation, segment_captions, segment_classes
from ttd.segment.whole_image import WindowFeatures, Windowing, encode_windowed
from ttd.jobs.decoding import Positioned
from ttd.jobs.decode_items import caption_tags
from ttd.jobs.tag_job import contained_path, safe_name


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


def decode_whole(items: list[Item], captions: bool, max_pixels: int, windowing: Windowing) -> list:
    """Each item's image cut into the model's windows (a WindowedImage), or the error that names
    its problem (runs in a decoding worker)."""
    outcomes: list = []
    for item in items:
        try:
            if item.error:
                raise InputError(item.error)
            if captions:
                caption_tags(item)
            data = getattr(item, "data", None)  # a webdataset sample's own image bytes (ttd.data.items.ShardItem)
            outcomes.append(windowing.cut(decode_image(item.path if data is None else data, item.image, max_pixels)))
        except (ImageError, ValueError, OSError) as error:
            outcomes.append(str(error))
    return outcomes


@dataclass
class EncodedBatch:
    """A batch after the image encoder: its items, their windowed images (or errors) and each
    decoded image's window features, by offset in the batch."""

    batch: Positioned
    outcomes: list
    features: dict[int, WindowFeatures]


@dataclass
class WholeImageStep:
    """The whole-image step (`ttd segment`, `ttd tag --crop whole`): each image covered by windows at
    its own size; the windows of a batch's images share encoder calls (`options.batch_size` windows
    a call), then each image's caption masks or class segmentation is cut from its maps."""

    classes: list[str] | None = None  # None: each item's caption
    options: SegmentOptions = SegmentOptions()
    masks_dir: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    class_embeds: np.ndarray | None = None
    captions_ahead: TextsAhead | None = None  # bound: the captions of items read, not yet recorded

    def description(self) -> dict:
        options = {k: v for k, v in dataclasses.asdict(self.options).items() if k != "batch_size"}  # speed only
        return {"mode": "segment", "classes": self.classes, "options": options,
                "masks_dir": str(self.masks_dir) if self.masks_dir else None, "max_pixels": self.max_pixels}

    def bound(self, tagger: Tagger, progress: bool = False) -> WholeImageStep:
        if self.classes is None:
            return dataclasses.replace(self, captions_ahead=TextsAhead(tagger))
        if not self.classes or self.class_embeds is not None:
            return self
        return dataclasses.replace(self, class_embeds=tagger.encode_tags(self.classes, progress))

    def ahead(self, item: Item) -> None:
        """`item` was read: its caption will be asked for (the runner reads a few batches ahead)."""
        if self.captions_ahead is not None and item.caption is not None:
            self.captions_ahead.announce(item.caption)

    def decoder(self, tagger: Tagger) -> Callable[[list[Item]], list]:
        options = self.options
        return functools.partial(decode_whole, captions=self.classes is None, max_pixels=self.max_pixels,
                                 windowing=Windowing.of(tagger, options.crop, options.scales, options.stride))

    def run(self, tagger: Tagger, batch: Positioned, outcomes: list) -> EncodedBatch:
        """The image encoder over the windows of the batch's images (this thread: the one that feeds
        the device); the rest of the batch's work is the record stage's (`records`), which runs
        in a second thread while this one encodes the next batch."""
        decoded = [k for k, outcome in enumerate(outcomes) if not isinstance(outcome, str)]
        features = {}
        if decoded:
            encoded = encode_windowed(tagger, [outcomes[k] for k in decoded], self.options.batch_size)
            features = dict(zip(decoded, encoded))
        return EncodedBatch(batch, outcomes, features)

    def segmented(self, tagger: Tagger, encoded: EncodedBatch) -> list[Segmentation | str]:
        """Each item's segmentation (or error): the tag head over all the batch's windows at once,
        masks only for what the record holds."""
        results: list = list(encoded.outcomes)
        keys = sorted(encoded.features)
        if not keys:
            return results
        if self.classes is None:
            segmented = segment_captions(tagger, [encoded.features[k] for k in keys],
                                         [encoded.batch[k][1].caption for k in keys], self.options,
                                         self.captions_ahead.embeddings if self.captions_ahead else None)
            for k, result in zip(keys, segmented):
                results[k] = result
            return results
        for k in keys:
            try:
                results[k] = segment_classes(tagger, None, self.classes, self.options, self.class_embeds,
                                             encoded.features[k])
            except ValueError as error:
                results[k] = str(error)
        return results

    def records(self, tagger: Tagger, ran: EncodedBatch) -> list[dict]:
        results = self.segmented(tagger, ran)
        return [self._record(position, item, result) for (position, item), result in zip(ran.batch, results)]

    def _record(self, position: int, item: Item, result: Segmentation | str) -> dict:
        """The output line of one item: its segmentation, or the error that names its problem."""
        if isinstance(result, str):
            return {"index": position, "image": item.image,
                    **({"caption": item.caption} if self.classes is None else {}), "error": result}
        record = to_record(item, result)
        if self.masks_dir is not None:
            try:  # folders named by global position: shards writing one masks folder never collide
                record.update(_write_pngs(self.masks_dir, position, item, result))
            except (OSError, ValueError) as error:
                record["error"] = f"cannot write masks: {error}"
        return {"index": position, **record}


def write_coco_of(output: Path, coco: Path) -> None:
    """The COCO JSON of a finished segmentation output."""
    with Path(output).open(encoding="utf-8") as lines:
        write_coco([json.loads(line) for line in lines if line.strip()], coco)
