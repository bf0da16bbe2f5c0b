"""Batch tagging of many images (`ttd tag`): streams JSON lines, one per input item, in input
order. A bad item (unreadable image, empty caption, ...) becomes an error record; the others
are still tagged and written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ttd.data.inputs import Item
from ttd.errors import InputError
from ttd.runtime.tagger import Tagger, TagResult
from ttd.jobs.mask_files import mask_image

SAFE = re.compile(r"[^a-z0-9_-]+")


def safe_name(text: str, limit: int = 60) -> str:
    return SAFE.sub("_", text.lower()).strip("_")[:limit] or "x"


def contained_path(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that would resolve outside root."""
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InputError(f"refusing to write {path}: outside {root}")
    return path


def warn_indistinct_tags(tagger: Tagger, tags: list[str]) -> None:
    """Warn when tags are the same token sequence for this model's tokenizer (e.g. non-ASCII or
    unknown words under a word tokenizer): they get one embedding and the same scores."""
    groups: dict[bytes, list[str]] = {}
    for tag, row in zip(tags, tagger.tokenizer(tags)):
        groups.setdefault(row.tobytes(), []).append(tag)
    same = [group for group in groups.values() if len(group) > 1]
    if same:
        shown = "; ".join(", ".join(repr(t) for t in group[:5]) + (" ..." if len(group) > 5 else "") for group in same[:5])
        warnings.warn(f"{sum(len(g) for g in same)} vocabulary tags are indistinguishable to this model's tokenizer "
                      f"(words it does not know) and will get identical scores: {shown}", stacklevel=2)


def item_record(item: Item, result: TagResult, vocabulary_mode: bool, top_k: int, mask_paths: dict[str, str]) -> dict:
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


def write_masks(masks_dir: Path, index: int, item: Item, result: TagResult, size: int,
                image_size: tuple[int, int]) -> dict[str, str]:
    """PNG masks of the selected tags in the image's own (width, height) (ttd/jobs/mask_files.py)."""
    folder = contained_path(masks_dir, f"{index:06d}_{safe_name(Path(item.image).stem)}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for tag in result.selected:
        position = result.tags.index(tag)  # the tag's place among the candidates: unique in the item
        mask = result.masks[position]
        png = mask_image(mask, size, image_size)
        path = contained_path(folder, f"{position:04d}_{safe_name(tag)}.png")
        png.save(path)
        paths[tag] = str(path)
    return paths


def split_outcomes(chunk: list[Item], outcomes: list, vocabulary: list[str] | None) -> tuple[dict[int, dict], dict]:
    """Error records and prepared (image, tags, image's own size) by offset in the chunk."""
    records: dict[int, dict] = {}
    prepared: dict[int, tuple[np.ndarray, list[str], tuple[int, int]]] = {}
    for offset, (item, outcome) in enumerate(zip(chunk, outcomes, strict=True)):
        if isinstance(outcome, str):
            records[offset] = {"image": item.image, "caption": item.caption, "error": outcome}
        else:
            image, tags, size = outcome
            prepared[offset] = (image, vocabulary if tags is None else tags, size)
    return records, prepared
