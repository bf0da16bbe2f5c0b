"""Indexed image-text sources for training: the world, a jsonl + image folder, webdataset shards.

A source maps an index to (uint8 image [S, S, 3] at the model's size, caption). Training picks
indices from the step number alone, so a resumed run sees exactly the batches it would have seen.
A sample that cannot be read raises `ImageError`; the trainer skips and counts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttd.errors import InputError
from ttd.runtime.images import ImageError, Preprocess


@dataclass
class WorldSource:
    seed: int
    image_size: int = 64
    length: int = 2**40  # effectively endless: every index is a new pair

    def __len__(self) -> int:
        return self.length

    def get(self, index: int) -> tuple[np.ndarray, str]:
        from ttd.data.world import make_sample

        sample = make_sample(self.seed, index, self.image_size)
        return sample.image, sample.caption


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a malformed line is an error naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: a JSON {type(record).__name__}, expected an object like "
                             '{"image": ..., "caption": ...}')
        records.append(record)
    return records


@dataclass
class JsonlSource:
    """`captions.jsonl` lines {"image": relative path, "caption": text}, images beside it."""

    path: Path
    preprocess: Preprocess

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.records = read_jsonl(self.path)
        if not self.records:
            raise InputError(f"{self.path}: no records")

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int) -> tuple[np.ndarray, str]:
        record = self.records[index]
        return self.preprocess(self.path.parent / record["image"], record["image"]), str(record["caption"])


class ShardSource:
    """img2dataset webdataset shards (jpg/png/webp + txt or json caption), loaded into an index.

    Shards are scanned once; undecodable samples are counted in `skipped` when read.
    """

    def __init__(self, pattern: str, preprocess: Preprocess) -> None:
        import webdataset as wds

        self.preprocess = preprocess
        self.samples: list[tuple[str, bytes, str]] = []
        for sample in wds.WebDataset(pattern, shardshuffle=False, empty_check=False):
            key = sample.get("__key__", "?")
            data = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), b"")
            try:  # strict, as a JSONL captions file is read: U+FFFD would be tagged as if it were a word
                caption = sample.get("txt", b"").decode("utf-8") if "txt" in sample else ""
            except UnicodeDecodeError as error:
                caption = f"\0caption is not valid UTF-8 (byte {error.start})"  # \0: no text starts so
            if not caption and "json" in sample:
                try:
                    caption = str(json.loads(sample["json"]).get("caption", ""))
                except (ValueError, AttributeError):
                    caption = ""
            self.samples.append((key, data, caption))
        if not self.samples:
            raise InputError(f"no samples found in shards {pattern}")

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int) -> tuple[np.ndarray, str]:
        key, data, caption = self.samples[index]
        if caption.startswith("\0"):
            raise ImageError(f"sample {key}: {caption[1:]}")
        if not caption.strip():
            raise ImageError(f"sample {key}: empty caption")
        return self.preprocess(data, f"sample {key}"), caption


def open_source(spec: str, preprocess: Preprocess, seed: int):
    """`world` (the synthetic world), a .jsonl file, or a webdataset shard pattern (.tar); images
    come out through `preprocess` (the model's own: `Preprocess.for_model(config)`)."""
    if spec == "world":
        return WorldSource(seed, preprocess.size)
    if spec.endswith(".jsonl"):
        return JsonlSource(Path(spec), preprocess)
    if ".tar" in spec:
        return ShardSource(spec, preprocess)
    raise InputError(f"unknown data {spec!r}: use 'world', a captions .jsonl file, or shards like 'data/{{000..009}}.tar'")
