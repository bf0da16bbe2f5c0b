"""Streaming item readers for `ttd tag` at scale: captions files (JSONL/CSV), folders or globs of
images, and webdataset tar shards, read lazily so that no full index of the job is ever held.

Every reader yields `Item`s in one deterministic order, so an item's position in the stream is
its identity: `--resume` skips the positions already written and `--shard i --num-shards n`
keeps the positions p with p % n == i. A line or sample that cannot be used becomes an item
with an error (as in ttd/data/inputs.py), so positions never shift because of bad input.
"""

from __future__ import annotations

import codecs
import csv
import fnmatch
import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice, takewhile
from pathlib import Path

from ttd.data.inputs import BAD_BYTES, CAPTION_KEYS, IMAGE_KEYS, IMAGE_SUFFIXES, InputError, Item, _pick, missing_file

SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ShardItem(Item):
    """An item of a webdataset shard: the image is the sample's encoded bytes, not a file."""

    data: bytes | None = None


def is_shard_pattern(spec: str) -> bool:
    """A webdataset shard spec: a .tar path, URL or brace pattern (`shards/{000..099}.tar`)."""
    return ".tar" in spec and not Path(spec).is_dir()


def _item_of(record: dict | str, line: int, base: Path, name: str) -> Item:
    """The item of one parsed line (or the reason it is unusable); the rules of ttd.data.inputs.read_captions."""
    where = f"{name}:{line}"
    if isinstance(record, str):
        return Item(f"<line {line}>", base, None, f"{where}: {record}")
    image, caption = _pick(record, IMAGE_KEYS), _pick(record, CAPTION_KEYS)
    if caption is not None and not isinstance(caption, str):
        return Item(image if isinstance(image, str) else f"<line {line}>", base, None,
                    f"{where}: caption is {type(caption).__name__} {caption!r}, not text")
    if image is None:
        return Item(f"<line {line}>", base, caption, f"{where}: no image field ({', '.join(IMAGE_KEYS)})")
    if not isinstance(image, str) or not image.strip():
        return Item(f"<line {line}>", base, caption, f"{where}: image is {image!r}, not a file name")
    return Item(image, base / image, caption)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(line, record or the reason it is unusable), one line in memory at a time; lines split on
    newline bytes only (a JSON string may hold U+2028), so one bad byte costs one line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield n, f"not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                yield n, f"not a JSON object ({error})"
                continue
            yield n, record if isinstance(record, dict) else "not a JSON object"


def _csv_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not any(k in reader.fieldnames for k in IMAGE_KEYS):
            raise InputError(f"{path}: CSV header must name an image column ({', '.join(IMAGE_KEYS)}) and a caption column")
        for row in reader:
            bad = any(isinstance(v, str) and BAD_BYTES.search(v) for v in row.values())
            yield reader.line_num, "not valid UTF-8" if bad else dict(row)


def count_lines(path: Path) -> int:
    """Non-empty lines of a file, counted in 1 MiB blocks."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n") - block.count(b"\n\n")
            last = block[-1:]
    return lines + (last != b"\n")


def count_items(path: Path) -> int | None:
    """The items of a .jsonl or .csv captions file, without reading them (a progress bar's total):
    a CSV's records, which may hold quoted newlines; None for any other input."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in (".jsonl", ".ndjson", ".json", ".csv"):
        return None
    if suffix != ".csv":
        return count_lines(path)
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        return max(0, sum(1 for row in csv.reader(f) if row) - 1)  # the header is not an item


def stream_captions(path: Path) -> Iterator[Item]:
    """Items of a .jsonl or .csv captions file, read lazily (same items as ttd.data.inputs.read_captions)."""
    path = Path(path)
    if not path.is_file():
        raise missing_file(path, "captions")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _csv_records(path)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        records = _jsonl_records(path)
    else:
        raise InputError(f"{path}: captions must be a .jsonl or .csv file (or webdataset shards: a .tar pattern)")
    if suffix == ".csv":  # the header is checked now, not at the first item
        first = next(records, None)
        records = records if first is None else _chain_one(first, records)
    return (_item_of(record, n, path.parent, path.name) for n, record in records)


def read_captions(path: Path) -> list[Item]:
    """All the items of a captions file at once (`stream_captions`, gathered): the one reader."""
    return list(stream_captions(path))


def _chain_one(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _walk_sorted(root: Path) -> Iterator[Path]:
    """Files under root in sorted order, one directory listing in memory at a time."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(Path(entry.path))
        else:
            yield Path(entry.path)


def _glob_root(pattern: str) -> Path:
    """The longest leading folder of a glob pattern without wildcards."""
    parts = Path(pattern).parts
    fixed = list(takewhile(lambda part: not glob.has_magic(part), parts))
    return Path(*fixed) if fixed else Path(".")


def _glob_parts(pattern: str) -> tuple[str, ...]:
    """The components of a glob pattern below its _glob_root."""
    parts = Path(pattern).parts
    fixed = len(list(takewhile(lambda part: not glob.has_magic(part), parts)))
    return parts[fixed:]


def _name_matches(name: str, part: str) -> bool:
    """One path component against one pattern component, as the glob module matches it: a
    wildcard never matches a leading dot (hidden files), the case is significant (POSIX)."""
    if name.startswith(".") and not part.startswith(".") and glob.has_magic(part):
        return False
    return fnmatch.fnmatchcase(name, part)


def _glob_matches(parts: tuple[str, ...], names: tuple[str, ...], prefix: bool = False) -> bool:
    """Whether the relative path `names` matches the pattern components `parts` with the glob
    module's recursive rules (`**` alone in a component: zero or more folders, or files at the
    end; `*` within one component only). `prefix`: whether a folder at `names` may hold matches."""
    seen: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        if (i, j) in seen:
            return seen[i, j]
        if j == len(names):
            result = i < len(parts) if prefix else all(p == "**" for p in parts[i:])
        elif i == len(parts):
            result = False
        elif parts[i] == "**":
            result = match(i + 1, j) or (not names[j].startswith(".") and match(i, j + 1))
        else:
            result = _name_matches(names[j], parts[i]) and match(i + 1, j + 1)
        seen[i, j] = result
        return result

    return match(0, 0)


def _glob_sorted(pattern: str) -> Iterator[Path]:
    """The files matching a glob pattern with the standard library's semantics (glob.glob with
    recursive=True), streamed in the sorted depth-first order of a folder walk; folders that
    cannot hold a match are not entered, symbolic links to folders are not followed."""
    parts = _glob_parts(pattern)

    def walk(folder: Path, names: tuple[str, ...]) -> Iterator[Path]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            below = (*names, entry.name)
            if entry.is_dir(follow_symlinks=False):
                if _glob_matches(parts, below, prefix=True):
                    yield from walk(Path(entry.path), below)
            elif _glob_matches(parts, below):
                yield Path(entry.path)

    return walk(_glob_root(pattern), ())


def _is_pattern(spec: Path | str) -> bool:
    return glob.has_magic(str(spec)) and not Path(spec).exists()


def _folder_images(folder: Path) -> Iterator[Path]:
    return (found for found in _walk_sorted(folder) if found.suffix.lower() in IMAGE_SUFFIXES)


def check_image_specs(paths: Iterable[Path | str]) -> None:
    """Refuse image arguments that name nothing (InputError, one line): a glob pattern that
    matches no file, a folder that does not exist or holds no image, a missing path that is not
    an image file's name. A missing image file stays one error item, as any unreadable image.
    Only as much of each folder is listed as it takes to find its first match."""
    specs = list(paths)
    if not specs:
        raise InputError("no image arguments: give image files, folders or quoted glob patterns")
    for spec in specs:
        path = Path(spec)
        if _is_pattern(spec):
            if next(_glob_sorted(str(spec)), None) is None:
                root = _glob_root(str(spec))
                why = f"folder {root} does not exist" if not root.is_dir() else "no file matches it"
                raise InputError(f"image pattern {spec}: {why}")
        elif path.is_dir():
            if next(_folder_images(path), None) is None:
                raise InputError(f"folder {spec} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        elif not path.exists() and (str(spec).endswith(("/", os.sep)) or path.suffix.lower() not in IMAGE_SUFFIXES):
            raise InputError(f"{spec}: no such file or folder")


def stream_images(paths: Iterable[Path | str]) -> Iterator[Item]:
    """Vocabulary-mode items: image files named directly, found (sorted, recursively) in folders,
    or matching a glob pattern (`photos/**/*.jpg`, the glob module's rules), listed lazily.

    The arguments are checked now (check_image_specs: an argument that names nothing is an
    InputError before any output is opened); the items are listed as they are read."""
    specs = list(paths)
    check_image_specs(specs)
    return _stream_images(specs)


def _stream_images(specs: list[Path | str]) -> Iterator[Item]:
    for spec in specs:
        path = Path(spec)
        if _is_pattern(spec):
            for found in _glob_sorted(str(spec)):
                yield Item(str(found), found, None)
        elif path.is_dir():
            for found in _folder_images(path):
                yield Item(str(found), found, None)
        else:
            yield Item(str(path), path, None)


def shard_urls(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern (`shards/{000..099}.tar`), in order."""
    import braceexpand

    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def _sample_item(sample: dict, url: str) -> Item:
    key = sample.get("__key__", "?")
    name = f"{url}#{key}"
    data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
    caption = None
    if "txt" in sample:
        try:  # strict, as a JSONL captions file is read: U+FFFD would be tagged as if it were a word
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as error:
            return ShardItem(name, Path(url), None, f"{name}: caption is not valid UTF-8 (byte {error.start})")
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
            caption = meta.get("caption") if isinstance(meta, dict) else None
        except ValueError:
            caption = None
    if data is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        return ShardItem(name, Path(url), caption, f"{name}: no image in the sample (found {', '.join(found) or 'nothing'})")
    return ShardItem(name, Path(url), caption if isinstance(caption, str) else None, data=data)


def stream_shards(pattern: str) -> Iterator[Item]:
    """Items of webdataset tar shards (local paths or any URL webdataset opens), streamed one
    sample at a time. A shard that cannot be opened or read to its end becomes one error item
    naming it; the other shards are still read."""
    import webdataset as wds

    for url in shard_urls(pattern):
        try:
            for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
                yield _sample_item(sample, url)
        except Exception as error:  # noqa: BLE001 - any failure of one shard is that shard's error item
            yield ShardItem(f"{url}#<shard>", Path(url), None, f"{url}: cannot read the shard ({type(error).__name__}: {error})")


def open_items(captions: str | Path | None, images: Iterable[Path | str] = ()) -> Iterator[Item]:
    """The job's items: a captions file or shard pattern (caption mode), or images (vocabulary mode)."""
    if captions is not None:
        spec = str(captions)
        return stream_shards(spec) if is_shard_pattern(spec) else stream_captions(Path(spec))
    return stream_images(images)


def check_shard(shard: int, num_shards: int) -> None:
    if not 0 <= shard < num_shards:
        raise InputError(f"--shard {shard} is not in 0..{num_shards - 1} (--num-shards {num_shards})")


def select_shard(items: Iterable[Item], shard: int, num_shards: int, skip: int = 0) -> Iterator[tuple[int, Item]]:
    """(position, item) of the items of shard `shard` of `num_shards` (position p with
    p % num_shards == shard), after the first `skip` of them (already done: resume).

    Disjoint and complete across shards; the positions are global, so shard outputs merge by
    concatenation and sort back into input order by position."""
    check_shard(shard, num_shards)
    mine = ((p, item) for p, item in enumerate(items) if p % num_shards == shard)
    return islice(mine, skip, None)


class ShardImages:
    """The encoded images of chosen samples of webdataset shards, read again from the shards as
    they are iterated, one sample in memory at a time: holding them from the first read would
    hold up to --max-pairs images' bytes (docs/reliability.md, "Smaller things"). Shards that
    changed between the two reads are refused, never a caption paired with another image."""

    def __init__(self, pattern: str, chosen: list[tuple[int, str]]) -> None:
        self.pattern = pattern
        self.chosen = chosen  # (position in the stream, sample name), in stream order

    def __len__(self) -> int:
        return len(self.chosen)

    def __iter__(self) -> Iterator[bytes]:
        wanted = iter(self.chosen)
        position, name = next(wanted, (-1, ""))
        for index, item in enumerate(stream_shards(self.pattern)):
            if position < 0:
                return  # past the last chosen sample: the rest is never read
            if index == position:
                if item.image != name or item.error or not isinstance(item, ShardItem) or item.data is None:
                    break
                yield item.data
                position, name = next(wanted, (-1, ""))
        if position >= 0:
            raise InputError(f"{self.pattern}: sample {name} is not where the first read found it: the shards changed "
                             "while they were read; calibrate again once they are written")


def read_pairs(captions: str | Path, max_pairs: int, skipped: list[str]) -> tuple[list[Path] | ShardImages, list[str]]:
    """(images, captions) of the first `max_pairs` usable items of a captions file or shard
    pattern (what `ttd tag --captions` reads): the pairs label-free calibration fits on. Images
    are paths, or for shards a ShardImages that reads them again as they are taken. An unusable
    item is left out, its reason appended to `skipped`; InputError if none is usable."""
    paths: list[Path] = []
    chosen: list[tuple[int, str]] = []
    texts: list[str] = []
    for index, item in enumerate(open_items(captions)):
        if len(texts) >= max_pairs:
            break
        if item.error or not (item.caption or "").strip():
            skipped.append(item.error or f"{item.image}: no caption")
            continue
        if isinstance(item, ShardItem):
            chosen.append((index, item.image))
        else:
            paths.append(item.path)
        texts.append(item.caption)
    if len(texts) < 2:
        raise InputError(f"{captions}: {len(texts)} usable image-caption pair(s); label-free calibration needs at "
                         f"least 2 (a few hundred for a stable margin){skipped_summary(skipped)}")
    return (ShardImages(str(captions), chosen) if chosen else paths), texts


def _skip_kind(reason: str) -> str:
    text = reason.lower()
    if "cannot read the shard" in text:
        return "unreadable or missing shard"
    if "not found" in text or "no such file" in text or "does not exist" in text:
        return "file not found"
    if "caption" in text:
        return "caption"
    return "image"


def skipped_summary(skipped: list[str], first: int = 3) -> str:
    """"; N items skipped (counts by kind; the first few)", for a refusal whose cause may be what was
    skipped (a fit that failed for want of pairs says why they were missing), or "" if none."""
    if not skipped:
        return ""
    kinds: dict[str, int] = {}
    for reason in skipped:
        kinds[_skip_kind(reason)] = kinds.get(_skip_kind(reason), 0) + 1
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return f"; {len(skipped)} skipped ({counts}), first: " + "; ".join(skipped[:first])
