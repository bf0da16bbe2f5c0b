"""The evaluation format: a folder with `annotations.jsonl` and the images and masks it names.

Each line: {"image": "images/000001.png", "caption": "...", "relevant_tags": [...],
"tag_masks": {"tag": "masks/000001_tag.png", ...}, "caption_mask": "masks/000001_caption.png"}.
Masks are 8-bit PNGs at the image's size, non-zero inside. `ttd world generate` writes this
format; `convert_tagmask` reads the CC3M-TagMask layout into it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ttd.data.sources import read_jsonl
from ttd.errors import InputError
from ttd.runtime.images import Preprocess, decode_image, resize_center_crop


@dataclass
class EvalSample:
    image: np.ndarray  # uint8 [H, W, 3] at the model's size
    caption: str
    relevant_tags: list[str]
    tag_masks: dict[str, np.ndarray]  # bool [H, W]
    caption_mask: np.ndarray | None


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)


def write_world_split(out: Path, seed: int, count: int, start: int = 0, progress: bool = True) -> Path:
    """Write world samples start..start+count-1 of `seed` in the evaluation format, into a new
    or empty folder (files of an earlier split would stay behind as orphans)."""
    from ttd.data.world import make_sample

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; choose a new folder (or delete this one)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    lines = []
    for index in tqdm(range(start, start + count), disable=not progress, desc="world"):
        sample = make_sample(seed, index)
        name = f"{index:06d}"
        Image.fromarray(sample.image).save(out / "images" / f"{name}.png")
        tag_paths = {}
        for tag in sample.relevant_tags:
            rel = f"masks/{name}_{tag}.png"
            _save_mask(sample.tag_masks[tag], out / rel)
            tag_paths[tag] = rel
        _save_mask(sample.caption_mask(), out / "masks" / f"{name}_caption.png")
        lines.append({"image": f"images/{name}.png", "caption": sample.caption, "relevant_tags": sample.relevant_tags,
                      "tag_masks": tag_paths, "caption_mask": f"masks/{name}_caption.png"})
    path = out / "annotations.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _load_mask(path: Path, size: int, image_size: tuple[int, int]) -> np.ndarray:
    """A mask file as bool at the model's size: non-zero inside, whatever the stored values
    (0/255, 0/1, 16-bit, palette indices). It must have its image's size (cropping or stretching
    a mask of another size would score against the wrong pixels)."""
    if not path.is_file():
        raise InputError(f"mask {path} does not exist")
    try:
        with Image.open(path) as mask:
            mask.load()
            values = np.asarray(mask)
    except OSError as error:
        raise InputError(f"mask {path} cannot be read ({error})") from error
    if values.ndim == 3:
        values = values.any(axis=-1)
    if (values.shape[1], values.shape[0]) != image_size:
        raise InputError(f"mask {path} is {values.shape[1]}x{values.shape[0]}, its image {image_size[0]}x{image_size[1]}")
    inside = Image.fromarray((values != 0).astype(np.uint8) * 255, "L").convert("RGB")
    return resize_center_crop(inside, size, "nearest")[..., 0] > 127


def read_eval_split(annotations: Path, preprocess: Preprocess, errors: list[str] | None = None) -> list[EvalSample]:
    """Samples of an evaluation folder, images and masks brought to the model's size. A sample
    whose image or masks cannot be used is left out, its reason (file and line) appended to
    `errors` (or warned about when no list is given); the others are still evaluated."""
    base, image_size = annotations.parent, preprocess.size
    samples = []
    for number, record in enumerate(read_jsonl(annotations), start=1):
        try:
            decoded = decode_image(base / record["image"], max_pixels=preprocess.max_pixels)
            image = preprocess(decoded)
            masks = {t: _load_mask(base / p, image_size, decoded.size) for t, p in record.get("tag_masks", {}).items()}
            caption_mask = (_load_mask(base / record["caption_mask"], image_size, decoded.size)
                            if record.get("caption_mask") else None)
            samples.append(EvalSample(image, record["caption"], list(record["relevant_tags"]), masks, caption_mask))
        except (ValueError, KeyError, TypeError) as error:
            reason = f"{annotations}: record {number}: {error if not isinstance(error, KeyError) else f'no {error} field'}"
            if errors is None:
                warnings.warn(reason, stacklevel=2)
            else:
                errors.append(reason)
    return samples


def world_eval_samples(seed: int, count: int, start: int = 0) -> list[EvalSample]:
    """The same samples as `write_world_split`, in memory."""
    from ttd.data.world import make_sample

    out = []
    for index in range(start, start + count):
        s = make_sample(seed, index)
        out.append(EvalSample(s.image, s.caption, s.relevant_tags, {t: s.tag_masks[t] for t in s.relevant_tags},
                              s.caption_mask()))
    return out


def convert_tagmask(source: Path, out: Path) -> Path:
    """CC3M-TagMask layout (one JSON per image with "caption", "tags", "tag_masks" {tag: png} and
    "caption_mask", beside the image and masks) -> the evaluation format, written to `out` with
    paths relative to `out` (the images stay where they are)."""
    lines = []
    out = out.resolve()
    for meta_path in sorted(source.resolve().rglob("*.json")):
        meta = json.loads(meta_path.read_text())
        if "caption" not in meta:
            raise InputError(f"{meta_path} has no 'caption'")
        image = meta.get("image") or meta_path.with_suffix(".jpg").name
        folder = Path(os.path.relpath(meta_path.parent, out))
        tag_masks = {str(t): str(folder / m) for t, m in meta.get("tag_masks", {}).items()}
        lines.append({"image": str(folder / image), "caption": meta["caption"],
                      "relevant_tags": [str(t) for t in meta.get("tags", tag_masks)],
                      "tag_masks": tag_masks,
                      "caption_mask": str(folder / meta["caption_mask"]) if meta.get("caption_mask") else None})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "annotations.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def labelled_samples(data: Path | None, preprocess: Preprocess, seed: int, count: int,
                     skipped: list[str] | None = None) -> list[EvalSample]:
    """The samples of an evaluation folder (or its annotations.jsonl), or world samples 0..count-1
    of `seed` when `data` is None. ValueError when the folder has no annotations or no usable
    sample; a sample that cannot be used is reported in `skipped` (see read_eval_split)."""
    if data is None:
        return world_eval_samples(seed, count)
    data = Path(data)
    annotations = data / "annotations.jsonl" if data.is_dir() else data
    if not annotations.is_file():
        raise InputError(f"{annotations} does not exist (expected an evaluation folder with annotations.jsonl)")
    samples = read_eval_split(annotations, preprocess, skipped)
    if not samples:
        raise InputError(f"{annotations}: no usable samples")
    return samples
