"""Reading the item lists of `ttd tag`: captions files (JSONL or CSV) and vocabulary files."""

from __future__ import annotations

import codecs
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ttd.errors import InputError  # noqa: F401 - re-exported: where callers have always found it

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "image_path", "path", "file", "filename", "url")
CAPTION_KEYS = ("caption", "text", "txt")


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
