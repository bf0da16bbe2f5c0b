"""Reading the item lists of `ttd tag`: captions files (JSONL or CSV) and vocabulary files."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "image_path", "path", "file", "filename", "url")
CAPTION_KEYS = ("caption", "text", "txt")


class InputError(ValueError):
    """A captions or vocabulary file is unusable as a whole; the message says why."""


@dataclass
class Item:
    image: str  # as written in the input (the output echoes it)
    path: Path  # resolved against the captions file's folder
    caption: str | None
    error: str | None = None


def _pick(record: dict, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        if key in record and record[key] is not None:
            return str(record[key])
    return None


def read_captions(path: Path) -> list[Item]:
    """Items of a .jsonl ({"image", "caption"} per line) or .csv (header with image, caption)."""
    if not path.is_file():
        raise InputError(f"captions file {path} does not exist")
    base = path.parent
    rows: list[tuple[int, dict | str]] = []  # (line, record or the reason it is unusable), in file order
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not any(k in reader.fieldnames for k in IMAGE_KEYS):
                raise InputError(f"{path}: CSV header must name an image column ({', '.join(IMAGE_KEYS)}) and a caption column")
            rows = [(n, dict(r)) for n, r in enumerate(reader, start=2)]
    elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append((n, record if isinstance(record, dict) else "not an object"))
            except ValueError as error:
                rows.append((n, str(error)))
    else:
        raise InputError(f"{path}: captions must be a .jsonl or .csv file")
    items: list[Item] = []
    for n, record in rows:
        if isinstance(record, str):
            items.append(Item(f"<line {n}>", base, None, f"{path.name}:{n}: not a JSON object ({record})"))
            continue
        image = _pick(record, IMAGE_KEYS)
        caption = _pick(record, CAPTION_KEYS)
        if image is None:
            items.append(Item(f"<line {n}>", base, caption, f"{path.name}:{n}: no image field ({', '.join(IMAGE_KEYS)})"))
        else:
            items.append(Item(image, base / image, caption))
    return items


def read_vocabulary(path: Path) -> list[str]:
    """One tag per line (blank lines and '#' comments ignored), de-duplicated in order."""
    if not path.is_file():
        raise InputError(f"vocabulary file {path} does not exist")
    tags = [line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines()]
    tags = list(dict.fromkeys(t for t in tags if t and not t.startswith("#")))
    if not tags:
        raise InputError(f"vocabulary file {path} has no tags")
    return tags


def list_images(paths: list[Path]) -> list[Item]:
    """Image files named directly or found (sorted, recursively) in folders."""
    items = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            items.extend(Item(str(p), p, None) for p in found)
        else:
            items.append(Item(str(path), path, None))
    return items
