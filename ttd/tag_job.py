"""Batch tagging of many images (`ttd tag`): streams JSON lines, one per input item, in input
order. A bad item (unreadable image, empty caption, ...) becomes an error record; the others
are still tagged and written."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ttd.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, resize_center_crop
from ttd.inputs import Item
from ttd.runtime.tagger import Tagger, TagResult
from ttd.tags import candidate_tags
from ttd.vocab_tagging import tag_with_vocabulary

SAFE = re.compile(r"[^a-z0-9_-]+")


@dataclass
class TagSummary:
    written: int = 0
    errors: int = 0


def safe_name(text: str, limit: int = 60) -> str:
    return SAFE.sub("_", text.lower()).strip("_")[:limit] or "x"


def contained_path(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that would resolve outside root."""
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"refusing to write {path}: outside {root}")
    return path


def _prepare(item: Item, tagger: Tagger, vocabulary: list[str] | None, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    if item.error:
        raise ValueError(item.error)
    if vocabulary is not None:
        tags = vocabulary
    else:
        if item.caption is None or not item.caption.strip():
            raise ValueError("empty caption")
        tags = candidate_tags(item.caption)
        if not tags:
            raise ValueError(f"caption {item.caption!r} has no candidate tags (only stopwords or punctuation)")
    image = decode_image(item.path, item.image, max_pixels)
    return resize_center_crop(image, tagger.config.image_size, tagger.config.interpolation), tags


def _record(item: Item, result: TagResult, vocabulary_mode: bool, top_k: int, mask_paths: dict[str, str]) -> dict:
    scored = [{"tag": t, "score": round(float(s), 6)} for t, s in zip(result.tags, result.scores)]
    record: dict = {"image": item.image}
    if vocabulary_mode:
        chosen = set(result.selected)
        record["selected"] = [c for c in scored if c["tag"] in chosen]
        record["top"] = sorted(scored, key=lambda c: -c["score"])[:top_k]
    else:
        record["caption"] = item.caption
        record["candidates"] = scored
        record["selected"] = result.selected
    if mask_paths:
        record["masks"] = mask_paths
    return record


def _write_masks(masks_dir: Path, index: int, item: Item, result: TagResult, size: int) -> dict[str, str]:
    folder = contained_path(masks_dir, f"{index:06d}_{safe_name(Path(item.image).stem)}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for tag in result.selected:
        mask = result.masks[result.tags.index(tag)]
        png = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)
        path = contained_path(folder, f"{safe_name(tag)}.png")
        png.save(path)
        paths[tag] = str(path)
    return paths


def tag_items(
    tagger: Tagger,
    items: list[Item],
    output: Path,
    vocabulary: list[str] | None = None,
    batch_size: int = 32,
    masks_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    top_k: int = 10,
    progress: bool = True,
    vocabulary_embeds: np.ndarray | None = None,
) -> TagSummary:
    """vocabulary_embeds: the vocabulary's tag embeddings if already known (ttd/vocab_cache.py)."""
    summary = TagSummary()
    output.parent.mkdir(parents=True, exist_ok=True)
    if vocabulary is not None and vocabulary_embeds is None:
        vocabulary_embeds = tagger.encode_tags(vocabulary, progress)  # once, before the first batch
    with output.open("w", encoding="utf-8") as out, tqdm(total=len(items), disable=not progress, unit="img") as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            prepared: dict[int, tuple[np.ndarray, list[str]]] = {}
            records: dict[int, dict] = {}
            for offset, item in enumerate(chunk):
                try:
                    prepared[offset] = _prepare(item, tagger, vocabulary, max_pixels)
                except (ImageError, ValueError, OSError) as error:
                    records[offset] = {"image": item.image, "caption": item.caption, "error": str(error)}
            if prepared:
                keys = sorted(prepared)
                batch = np.stack([prepared[k][0] for k in keys])
                if vocabulary is not None:  # one batched tag head for the shared vocabulary
                    results = tag_with_vocabulary(tagger, batch, vocabulary, vocabulary_embeds, masks_dir is not None)
                else:
                    results = tagger.tag(batch, [prepared[k][1] for k in keys])
                for key, result in zip(keys, results):
                    item = chunk[key]
                    masks = _write_masks(masks_dir, start + key, item, result, tagger.config.image_size) if masks_dir else {}
                    records[key] = _record(item, result, vocabulary is not None, top_k, masks)
            for offset in range(len(chunk)):
                record = records[offset]
                summary.errors += "error" in record
                summary.written += 1
                out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update(len(chunk))
    return summary
