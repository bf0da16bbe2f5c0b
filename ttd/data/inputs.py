"""Reading the item lists of `ttd tag`: captions files (JSONL or CSV) and vocabulary files."""

from __future__ import annotations

from ttd.errors import TTDError
import codecs
import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "image_path", "path", "file", "filename", "url")
CAPTION_KEYS = ("caption", "text", "txt")


class InputError(TTDError, ValueError):
    """A captions or vocabulary file is unusable as a whole; the message says why."""


@dataclass
class Item:
    image: str  # as written in the input (the output echoes it)
    path: Path  # resolved against the captions file's folder
    caption: str | None
    error: str | None = None


def _pick(record: dict, keys: tuple[str, ...]) -> object | None:
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return None


BAD_BYTES = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of bytes that are not UTF-8


def _jsonl_rows(path: Path) -> list[tuple[int, dict | str]]:
    """(line, record or the reason it is unusable): lines split on newline bytes only (a JSON
    string may hold U+2028), each decoded on its own, so one bad byte costs one line."""
    rows: list[tuple[int, dict | str]] = []
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            rows.append((n, f"not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"))
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rows.append((n, record if isinstance(record, dict) else "not a JSON object"))
        except ValueError as error:
            rows.append((n, f"not a JSON object ({error})"))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict | str]]:
    """(line, row or the reason it is unusable); a UTF-8 BOM is dropped, a row with bytes that
    are not UTF-8 becomes an error for that row only."""
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not any(k in reader.fieldnames for k in IMAGE_KEYS):
            raise InputError(f"{path}: CSV header must name an image column ({', '.join(IMAGE_KEYS)}) and a caption column")
        rows: list[tuple[int, dict | str]] = []
        for row in reader:
            bad = any(isinstance(v, str) and BAD_BYTES.search(v) for v in row.values())
            rows.append((reader.line_num, "not valid UTF-8" if bad else dict(row)))
        return rows


def read_captions(path: Path) -> list[Item]:
    """Items of a .jsonl ({"image", "caption"} per line) or .csv (header with image, caption).
    A line that cannot be used (bad JSON, bad UTF-8, a caption that is not text) becomes an
    item with an error naming the file and line; the other lines are still read."""
    if not path.is_file():
        raise missing_file(path, "captions")
    base = path.parent
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(path)
    else:
        raise InputError(f"{path}: captions must be a .jsonl or .csv file")
    items: list[Item] = []
    for n, record in rows:
        where = f"{path.name}:{n}"
        if isinstance(record, str):
            items.append(Item(f"<line {n}>", base, None, f"{where}: {record}"))
            continue
        image = _pick(record, IMAGE_KEYS)
        caption = _pick(record, CAPTION_KEYS)
        if caption is not None and not isinstance(caption, str):
            items.append(Item(image if isinstance(image, str) else f"<line {n}>", base, None,
                              f"{where}: caption is {type(caption).__name__} {caption!r}, not text"))
        elif image is None:
            items.append(Item(f"<line {n}>", base, caption, f"{where}: no image field ({', '.join(IMAGE_KEYS)})"))
        elif not isinstance(image, str) or not image.strip():
            items.append(Item(f"<line {n}>", base, caption, f"{where}: image is {image!r}, not a file name"))
        else:
            items.append(Item(image, base / image, caption))
    return items


def missing_file(path: Path, what: str) -> InputError:
    """Why `path` cannot be read as a `what` file: a folder, something else, or nothing there."""
    if path.is_dir():
        return InputError(f"{what} file {path} is a folder: give the file itself (a .jsonl or .csv file; images "
                          "in a folder are tagged against a --vocabulary)" if what == "captions" else
                          f"{what} file {path} is a folder: give the file itself")
    if path.exists():
        return InputError(f"{what} file {path} is not a regular file (a FIFO or a device)")
    return InputError(f"{what} file {path} does not exist")


def read_vocabulary(path: Path) -> list[str]:
    """One tag per line (blank lines and '#' comments ignored), de-duplicated in order."""
    if not path.is_file():
        raise missing_file(path, "vocabulary")
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    lines = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{path}:{n}: not valid UTF-8; save the vocabulary as UTF-8") from None
    tags = [line.strip().lower() for line in lines]
    for n, tag in enumerate(tags, start=1):
        if tag and not tag.startswith("#") and not any(c.isalnum() for c in tag):
            raise InputError(f"{path}:{n}: tag {tag!r} has no letter or digit (it would be an empty prompt)")
    tags = list(dict.fromkeys(t for t in tags if t and not t.startswith("#")))
    if not tags:
        raise InputError(f"vocabulary file {path} has no tags")
    return tags


def refuse_output_over_input(output, inputs, what: str) -> None:
    """Refuse an output that is one of the command's inputs, compared as resolved paths (a link or
    `..` names the same file): writing it would replace what is being read (docs/reliability.md)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    real = Path(os.path.abspath(output)).resolve()
    for given in inputs:
        if given is not None and Path(os.path.abspath(given)).resolve() == real:
            raise InputError(f"{output} is also an input ({given}): {what} would replace it; choose another output")
